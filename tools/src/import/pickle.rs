//! A reader for the Python pickles that data sets ship (CIFAR's `data_batch_1`, `meta`, ...):
//! protocols 2 to 5 as `cPickle` (Python 2) and `pickle` (Python 3) write them, limited to plain
//! data (None, bools, ints, floats, byte and text strings, lists, tuples, dicts) and numpy
//! arrays. Nothing is executed: the only callables understood are the handful that pickles of
//! numpy arrays and Python 3's protocol-2 `bytes` name (`numpy.core.multiarray._reconstruct`,
//! `numpy.dtype`, `numpy.core.numeric._frombuffer`, `_codecs.encode`); any other global is
//! kept as an opaque object, an error only where it is used.
//!
//! Every length is checked against what is left of the input, so a truncated or malformed file
//! is an error, never a panic or an allocation beyond the input's size.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A numpy array.
#[derive(Clone, Debug, PartialEq)]
pub struct NdArray {
    /// Sizes, outermost first.
    pub shape: Vec<usize>,
    /// The dtype's string (`u1`, `<i8`, ...).
    pub dtype: String,
    /// Column-major (`True` in the pickle).
    pub fortran_order: bool,
    /// The raw element bytes.
    pub data: Rc<[u8]>,
}

/// One unpickled value.
#[derive(Clone, Debug)]
pub enum Value {
    /// `None`.
    None,
    /// `True` or `False`.
    Bool(bool),
    /// An int that fits 64 bits.
    Int(i64),
    /// A float.
    Float(f64),
    /// `bytes` (or a Python 2 `str`).
    Bytes(Rc<[u8]>),
    /// `str` (Python 2 `unicode`).
    Str(Rc<str>),
    /// A list.
    List(Rc<RefCell<Vec<Value>>>),
    /// A tuple.
    Tuple(Rc<[Value]>),
    /// A dict, in insertion order.
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// A global (`module.name`), not called.
    Global(Rc<str>, Rc<str>),
    /// A numpy array; `None` between `_reconstruct` and the `BUILD` that fills it.
    Array(Option<Rc<NdArray>>),
    /// A numpy dtype, by its string.
    Dtype(Rc<str>),
    /// The result of calling a global this reader does not know.
    Object(Rc<str>),
}

impl Value {
    /// A short description for error messages.
    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) => "an int".into(),
            Value::Float(_) => "a float".into(),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Str(_) => "a str".into(),
            Value::List(l) => format!("a list of {}", l.borrow().len()),
            Value::Tuple(t) => format!("a tuple of {}", t.len()),
            Value::Dict(_) => "a dict".into(),
            Value::Global(m, n) => format!("the global {m}.{n}"),
            Value::Array(Some(a)) => format!("a numpy array {:?} of {}", a.shape, a.dtype),
            Value::Array(None) => "an unfilled numpy array".into(),
            Value::Dtype(d) => format!("the dtype {d}"),
            Value::Object(what) => format!("an object made by {what}"),
        }
    }

    /// The text of a `bytes` or `str` value (bytes as Latin-1, as `encoding='latin1'` does).
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.to_string()),
            Value::Bytes(b) => Some(b.iter().map(|&c| c as char).collect()),
            _ => None,
        }
    }

    /// The value under key `key` (a `bytes` or `str` key) of a dict.
    pub fn get(&self, key: &str) -> Option<Value> {
        let Value::Dict(d) = self else { return None };
        let d = d.borrow();
        d.iter()
            .find(|(k, _)| k.as_text().as_deref() == Some(key))
            .map(|(_, v)| v.clone())
    }

    /// The items of a list or tuple.
    pub fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::List(l) => Some(l.borrow().clone()),
            Value::Tuple(t) => Some(t.to_vec()),
            _ => None,
        }
    }
}

/// A position and a reason.
fn err(at: usize, what: impl std::fmt::Display) -> String {
    format!("pickle byte {at}: {what}")
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], String> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(err(
                self.pos,
                format!("{what} claims {n} bytes, only {left} are left (truncated?)"),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn uint(&mut self, n: usize, what: &str) -> Result<u64, String> {
        let b = self.take(n as u64, what)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    fn line(&mut self, what: &str) -> Result<&'a str, String> {
        let start = self.pos;
        let rest = &self.bytes[start..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return Err(err(start, format!("{what}: no end of line (truncated?)")));
        };
        self.pos += end + 1;
        std::str::from_utf8(&rest[..end]).map_err(|_| err(start, format!("{what}: not UTF-8")))
    }
}

fn text(bytes: &[u8], at: usize) -> Result<Value, String> {
    std::str::from_utf8(bytes)
        .map(|s| Value::Str(s.into()))
        .map_err(|_| err(at, "a str that is not UTF-8"))
}

/// `_reconstruct`, `dtype`, `_frombuffer` and `_codecs.encode`: the callables that plain data
/// and numpy arrays are pickled with.
fn call(func: &Value, args: &Value, at: usize) -> Result<Value, String> {
    let Value::Global(module, name) = func else {
        return Err(err(
            at,
            format!("REDUCE calls {}, not a global", func.kind()),
        ));
    };
    let args = match args {
        Value::Tuple(t) => t.clone(),
        other => return Err(err(at, format!("REDUCE arguments are {}", other.kind()))),
    };
    let numpy = matches!(
        &**module,
        "numpy.core.multiarray" | "numpy._core.multiarray" | "numpy.core.numeric"
    ) || &**module == "numpy._core.numeric";
    Ok(match (&**module, &**name) {
        (_, "_reconstruct") if numpy => Value::Array(None),
        ("numpy", "dtype") => match args.first().and_then(Value::as_text) {
            Some(d) => Value::Dtype(d.into()),
            None => return Err(err(at, "numpy.dtype without a type string")),
        },
        (_, "_frombuffer") if numpy => {
            // _frombuffer(buffer, dtype, shape, order)
            match (args.first(), args.get(1), args.get(2), args.get(3)) {
                (Some(Value::Bytes(data)), Some(Value::Dtype(d)), Some(shape), Some(order)) => {
                    Value::Array(Some(Rc::new(NdArray {
                        shape: shape_of(shape, at)?,
                        dtype: d.to_string(),
                        fortran_order: order.as_text().as_deref() == Some("F"),
                        data: data.clone(),
                    })))
                }
                _ => return Err(err(at, "numpy _frombuffer with unexpected arguments")),
            }
        }
        ("_codecs", "encode") => match (args.first(), args.get(1).and_then(Value::as_text)) {
            (Some(Value::Str(s)), Some(enc)) if enc == "latin1" || enc == "latin-1" => {
                let mut out = Vec::with_capacity(s.len());
                for c in s.chars() {
                    let c = u32::from(c);
                    if c > 0xff {
                        return Err(err(at, "_codecs.encode: a character beyond Latin-1"));
                    }
                    out.push(c as u8);
                }
                Value::Bytes(out.into())
            }
            _ => return Err(err(at, "_codecs.encode with unexpected arguments")),
        },
        _ => Value::Object(format!("{module}.{name}").into()),
    })
}

fn shape_of(v: &Value, at: usize) -> Result<Vec<usize>, String> {
    let items = v
        .items()
        .ok_or_else(|| err(at, format!("array shape is {}", v.kind())))?;
    items
        .iter()
        .map(|d| match d {
            Value::Int(n) if *n >= 0 => Ok(*n as usize),
            other => Err(err(at, format!("array size is {}", other.kind()))),
        })
        .collect()
}

/// `BUILD` on an array from `_reconstruct`: the state is
/// `(version, shape, dtype, fortran_order, data)`.
fn build_array(state: &Value, at: usize) -> Result<Value, String> {
    let items = state
        .items()
        .ok_or_else(|| err(at, format!("array state is {}", state.kind())))?;
    let [_, shape, dtype, fortran, data] = items.as_slice() else {
        return Err(err(
            at,
            format!("array state has {} items, expected 5", items.len()),
        ));
    };
    let shape = shape_of(shape, at)?;
    let Value::Dtype(dtype) = dtype else {
        return Err(err(at, format!("array dtype is {}", dtype.kind())));
    };
    let Value::Bytes(data) = data else {
        return Err(err(
            at,
            format!("array data is {}, expected bytes", data.kind()),
        ));
    };
    let fortran_order = matches!(fortran, Value::Bool(true) | Value::Int(1));
    Ok(Value::Array(Some(Rc::new(NdArray {
        shape,
        dtype: dtype.to_string(),
        fortran_order,
        data: data.clone(),
    }))))
}

/// Unpickles `bytes` (the whole file).
pub fn load(bytes: &[u8]) -> Result<Value, String> {
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u64, Value> = HashMap::new();
    let result = run(bytes, &mut stack, &mut memo);
    teardown(stack);
    teardown(memo.into_values());
    match result {
        Ok(v) if nested_beyond(&v, MAX_DEPTH) => {
            teardown([v]);
            Err(format!("containers nested more than {MAX_DEPTH} deep"))
        }
        other => other,
    }
}

/// The deepest nesting of lists, tuples and dicts that [`load`] returns.
pub const MAX_DEPTH: usize = 64;

/// Whether `v` holds containers nested more than `limit` deep, or a container that holds
/// itself. Each container is visited once (pickles can share one list many times over, so a
/// walk of every path could take exponential time); recursion is at most `limit` deep.
fn nested_beyond(v: &Value, limit: usize) -> bool {
    fn depth(
        v: &Value,
        limit: usize,
        known: &mut HashMap<usize, usize>,
        visiting: &mut std::collections::HashSet<usize>,
    ) -> Option<usize> {
        let (id, children): (usize, Vec<Value>) = match v {
            Value::List(l) => (
                Rc::as_ptr(l) as *const u8 as usize,
                l.try_borrow().ok()?.clone(),
            ),
            Value::Dict(d) => (
                Rc::as_ptr(d) as *const u8 as usize,
                d.try_borrow()
                    .ok()?
                    .iter()
                    .flat_map(|(k, v)| [k.clone(), v.clone()])
                    .collect(),
            ),
            Value::Tuple(t) => (Rc::as_ptr(t) as *const u8 as usize, t.to_vec()),
            _ => return Some(0),
        };
        if let Some(&d) = known.get(&id) {
            return Some(d);
        }
        if limit == 0 || !visiting.insert(id) {
            return None;
        }
        let mut d = 1;
        for c in &children {
            d = d.max(1 + depth(c, limit - 1, known, visiting)?);
        }
        visiting.remove(&id);
        known.insert(id, d);
        Some(d)
    }
    depth(v, limit, &mut HashMap::new(), &mut Default::default()).is_none()
}

/// Drops values without recursion: a malformed pickle can nest lists a million deep, which
/// the recursive `Drop` of `Rc<RefCell<Vec<Value>>>` would overflow the stack on. Containers
/// still shared elsewhere (or holding themselves) are only released, not walked.
fn teardown(values: impl IntoIterator<Item = Value>) {
    let mut work: Vec<Value> = values.into_iter().collect();
    while let Some(v) = work.pop() {
        match v {
            Value::List(mut l) => {
                if let Some(cell) = Rc::get_mut(&mut l) {
                    work.append(cell.get_mut());
                }
            }
            Value::Dict(mut d) => {
                if let Some(cell) = Rc::get_mut(&mut d) {
                    for (k, v) in cell.get_mut().drain(..) {
                        work.push(k);
                        work.push(v);
                    }
                }
            }
            Value::Tuple(mut t) => {
                if let Some(items) = Rc::get_mut(&mut t) {
                    for x in items.iter_mut() {
                        work.push(std::mem::replace(x, Value::None));
                    }
                }
            }
            _ => {}
        }
    }
}

fn run(
    bytes: &[u8],
    stack: &mut Vec<Value>,
    memo: &mut HashMap<u64, Value>,
) -> Result<Value, String> {
    let mut r = Reader { bytes, pos: 0 };
    let mut marks: Vec<usize> = Vec::new();
    loop {
        let at = r.pos;
        let Some(&op) = bytes.get(at) else {
            return Err(err(at, "end of file before STOP (truncated?)"));
        };
        r.pos += 1;
        let underflow = || err(at, format!("opcode 0x{op:02x} on an empty stack"));
        let pop_mark = |stack: &mut Vec<Value>, marks: &mut Vec<usize>| {
            let m = marks
                .pop()
                .ok_or_else(|| err(at, format!("opcode 0x{op:02x} without a MARK")))?;
            if m > stack.len() {
                return Err(err(at, "MARK beyond the stack"));
            }
            Ok::<Vec<Value>, String>(stack.split_off(m))
        };
        match op {
            0x80 => {
                let p = r.uint(1, "PROTO")?;
                if p > 5 {
                    return Err(err(at, format!("pickle protocol {p}, expected 2 to 5")));
                }
            }
            0x95 => {
                r.uint(8, "FRAME")?;
            }
            b'.' => return stack.pop().ok_or_else(underflow),
            b'}' => stack.push(Value::Dict(Rc::default())),
            b']' => stack.push(Value::List(Rc::default())),
            b')' => stack.push(Value::Tuple(Rc::new([]))),
            b'(' => marks.push(stack.len()),
            b't' => {
                let items = pop_mark(stack, &mut marks)?;
                stack.push(Value::Tuple(items.into()));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(underflow());
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items.into()));
            }
            b'U' | b'C' | b'T' | b'B' | 0x8e | 0x96 => {
                let n = match op {
                    b'U' | b'C' => r.uint(1, "string length")?,
                    b'T' | b'B' => r.uint(4, "string length")?,
                    _ => r.uint(8, "string length")?,
                };
                let what = if op == b'T' || op == b'U' {
                    "string"
                } else {
                    "bytes"
                };
                stack.push(Value::Bytes(r.take(n, what)?.into()));
            }
            b'X' | 0x8c | 0x8d => {
                let width = match op {
                    0x8c => 1,
                    b'X' => 4,
                    _ => 8,
                };
                let n = r.uint(width, "str length")?;
                stack.push(text(r.take(n, "str")?, at)?);
            }
            b'J' => stack.push(Value::Int(r.uint(4, "BININT")? as u32 as i32 as i64)),
            b'K' => stack.push(Value::Int(r.uint(1, "BININT1")? as i64)),
            b'M' => stack.push(Value::Int(r.uint(2, "BININT2")? as i64)),
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    r.uint(1, "LONG1")?
                } else {
                    r.uint(4, "LONG4")?
                };
                if n > 8 {
                    return Err(err(at, format!("an int of {n} bytes, more than 64 bits")));
                }
                let b = r.take(n, "LONG")?;
                let mut v = b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64);
                if n > 0 && n < 8 && b[n as usize - 1] & 0x80 != 0 {
                    v |= u64::MAX << (8 * n); // sign-extend
                }
                stack.push(Value::Int(v as i64));
            }
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'G' => {
                let b = r.take(8, "BINFLOAT")?;
                stack.push(Value::Float(f64::from_be_bytes(b.try_into().expect("8"))));
            }
            b'q' | b'r' | 0x94 => {
                let idx = match op {
                    b'q' => r.uint(1, "BINPUT")?,
                    b'r' => r.uint(4, "LONG_BINPUT")?,
                    _ => memo.len() as u64,
                };
                let top = stack.last().ok_or_else(underflow)?.clone();
                memo.insert(idx, top);
            }
            b'h' | b'j' => {
                let idx = if op == b'h' {
                    r.uint(1, "BINGET")?
                } else {
                    r.uint(4, "LONG_BINGET")?
                };
                let v = memo
                    .get(&idx)
                    .ok_or_else(|| err(at, format!("memo entry {idx} was never stored")))?;
                stack.push(v.clone());
            }
            b'c' => {
                let module = r.line("GLOBAL module")?;
                let name = r.line("GLOBAL name")?;
                stack.push(Value::Global(module.into(), name.into()));
            }
            0x93 => {
                let (Some(name), Some(module)) = (stack.pop(), stack.pop()) else {
                    return Err(underflow());
                };
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(m, n)),
                    _ => return Err(err(at, "STACK_GLOBAL of non-strings")),
                }
            }
            b'R' => {
                let (Some(args), Some(func)) = (stack.pop(), stack.pop()) else {
                    return Err(underflow());
                };
                stack.push(call(&func, &args, at)?);
            }
            b'b' => {
                let state = stack.pop().ok_or_else(underflow)?;
                let top = stack.last_mut().ok_or_else(underflow)?;
                match top {
                    Value::Array(None) => *top = build_array(&state, at)?,
                    // A dtype's state (byte order, flags) changes nothing read here.
                    Value::Dtype(_) | Value::Object(_) => {}
                    other => return Err(err(at, format!("BUILD on {}", other.kind()))),
                }
            }
            b'a' | b'e' => {
                let items = if op == b'a' {
                    vec![stack.pop().ok_or_else(underflow)?]
                } else {
                    pop_mark(stack, &mut marks)?
                };
                match stack.last() {
                    Some(Value::List(l)) => l.borrow_mut().extend(items),
                    Some(other) => return Err(err(at, format!("APPEND to {}", other.kind()))),
                    None => return Err(underflow()),
                }
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    if stack.len() < 3 {
                        return Err(underflow());
                    }
                    stack.split_off(stack.len() - 2)
                } else {
                    pop_mark(stack, &mut marks)?
                };
                if items.len() % 2 != 0 {
                    return Err(err(at, "SETITEMS with an odd number of items"));
                }
                match stack.last() {
                    Some(Value::Dict(d)) => {
                        let mut d = d.borrow_mut();
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                    Some(other) => return Err(err(at, format!("SETITEM on {}", other.kind()))),
                    None => return Err(underflow()),
                }
            }
            b'0' => {
                stack.pop().ok_or_else(underflow)?;
            }
            b'2' => {
                let top = stack.last().ok_or_else(underflow)?.clone();
                stack.push(top);
            }
            _ => {
                return Err(err(
                    at,
                    format!(
                    "unsupported opcode 0x{op:02x} (not a pickle of plain data and numpy arrays?)"
                ),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_python2_style_dict_with_an_array() {
        // {'labels': [3, 300], 'data': np.array([[1, 2, 3]], 'u1')} as cPickle protocol 2 writes it.
        let mut p = vec![0x80, 2, b'}', b'q', 1, b'('];
        p.extend(b"U\x06labelsq\x02]q\x03(K\x03M\x2c\x01e");
        p.extend(b"U\x04dataq\x04cnumpy.core.multiarray\n_reconstruct\nq\x05cnumpy\nndarray\nq\x06K\x00\x85U\x01b\x87Rq\x07");
        p.extend(b"(K\x01K\x01K\x03\x86cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T\x03\x00\x00\x00\x01\x02\x03tbu.");
        let v = load(&p).unwrap();
        let labels: Vec<i64> = v
            .get("labels")
            .unwrap()
            .items()
            .unwrap()
            .iter()
            .map(|x| match x {
                Value::Int(i) => *i,
                _ => panic!(),
            })
            .collect();
        assert_eq!(labels, [3, 300]);
        let Some(Value::Array(Some(a))) = v.get("data") else {
            panic!()
        };
        assert_eq!(
            (a.shape.clone(), a.dtype.as_str(), &a.data[..]),
            (vec![1, 3], "u1", &[1u8, 2, 3][..])
        );
        // Every truncation is an error, never a panic.
        for n in 0..p.len() {
            assert!(load(&p[..n]).is_err(), "{n}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        // A million lists, each appended to the one below: nested a million deep.
        let n = 1_000_000;
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', n));
        p.extend(std::iter::repeat_n(b'a', n - 1));
        p.push(b'.');
        let e = load(&p).unwrap_err();
        assert!(e.contains("nested more than 64 deep"), "{e}");
        // The same, cut short: the stack is torn down without recursion.
        assert!(load(&p[..p.len() - 1]).is_err());
        // Lists shared 2^60 times over: [L59, L59], L59 = [L58, L58], ...
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for i in 0..60u8 {
            p.extend([b']', b'q', i + 1, b'(', b'h', i, b'h', i, b'e', b'0']);
        }
        p.extend([b'h', 60, b'.']);
        assert!(matches!(load(&p), Ok(Value::List(_))));
        // A list that holds itself.
        let e = load(b"\x80\x02]q\x00h\x00a.").unwrap_err();
        assert!(e.contains("nested"), "{e}");
    }

    #[test]
    fn a_length_beyond_the_file_is_an_error() {
        let e = load(b"\x80\x02T\xff\xff\xff\x7f").unwrap_err();
        assert!(
            e.contains("claims 2147483647 bytes, only 0 are left"),
            "{e}"
        );
        let e = load(b"\x80\x02\x8e\xff\xff\xff\xff\xff\xff\xff\xff").unwrap_err();
        assert!(e.contains("only 0 are left"), "{e}");
    }
}
