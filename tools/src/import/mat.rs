//! A reader for MATLAB level 5 MAT-files (`save -v6`/`-v7`, `scipy.io.savemat`), limited to
//! what data set metadata holds: numeric arrays (read as `f64`), char arrays, cell arrays and
//! struct arrays, compressed (`miCOMPRESSED`, zlib) or not, either byte order. Sparse arrays
//! and objects are read as [`MatValue::Unsupported`]; HDF5-based v7.3 files are refused.
//!
//! Every length is checked against the data it lies in, nesting is limited, and decompression
//! stops at [`MAX_INFLATED_BYTES`]: a malformed file is an error, never a panic or an
//! allocation beyond a bounded multiple of its size.

use std::io::Read;

/// The most bytes one compressed variable may inflate to: 64 MiB (Stanford Cars' largest, cars_annos.mat, is a few MB).
pub const MAX_INFLATED_BYTES: u64 = 64 << 20;
/// The deepest nesting of cells and structs read.
pub const MAX_DEPTH: usize = 16;

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;
const MI_UTF16: u32 = 17;

/// One MATLAB array.
#[derive(Clone, Debug, PartialEq)]
pub enum MatValue {
    /// A numeric or logical array, every element as `f64`, column-major.
    Numeric {
        /// Sizes.
        dims: Vec<usize>,
        /// Elements.
        data: Vec<f64>,
    },
    /// A char array; the characters column-major.
    Char {
        /// Sizes.
        dims: Vec<usize>,
        /// Characters.
        chars: Vec<char>,
    },
    /// A cell array, column-major.
    Cell {
        /// Sizes.
        dims: Vec<usize>,
        /// Elements.
        items: Vec<MatValue>,
    },
    /// A struct array: for each element (column-major), one value per field.
    Struct {
        /// Sizes.
        dims: Vec<usize>,
        /// Field names.
        fields: Vec<String>,
        /// `items[element][field]`.
        items: Vec<Vec<MatValue>>,
    },
    /// Another class (sparse, object, function handle), by its class number.
    Unsupported(u8),
}

impl MatValue {
    /// A short description for error messages.
    pub fn kind(&self) -> String {
        let dims = |d: &[usize]| d.iter().map(usize::to_string).collect::<Vec<_>>().join("x");
        match self {
            MatValue::Numeric { dims: d, .. } => format!("a {} numeric array", dims(d)),
            MatValue::Char { dims: d, .. } => format!("a {} char array", dims(d)),
            MatValue::Cell { dims: d, .. } => format!("a {} cell array", dims(d)),
            MatValue::Struct { dims: d, .. } => format!("a {} struct array", dims(d)),
            MatValue::Unsupported(c) => format!("an array of unsupported class {c}"),
        }
    }

    /// The elements of a numeric array.
    pub fn numbers(&self) -> Option<&[f64]> {
        match self {
            MatValue::Numeric { data, .. } => Some(data),
            _ => None,
        }
    }

    /// The text of a char array of one row (or an empty one).
    pub fn text(&self) -> Option<String> {
        match self {
            MatValue::Char { dims, chars } if dims.len() == 2 && dims[0] <= 1 => {
                Some(chars.iter().collect())
            }
            _ => None,
        }
    }

    /// Field `name` of element `i` of a struct array.
    pub fn field(&self, i: usize, name: &str) -> Option<&MatValue> {
        match self {
            MatValue::Struct { fields, items, .. } => {
                let f = fields.iter().position(|f| f == name)?;
                items.get(i)?.get(f)
            }
            _ => None,
        }
    }

    /// Number of elements of a struct or cell array.
    pub fn len(&self) -> usize {
        match self {
            MatValue::Struct { items, .. } => items.len(),
            MatValue::Cell { items, .. } => items.len(),
            MatValue::Numeric { data, .. } => data.len(),
            MatValue::Char { chars, .. } => chars.len(),
            MatValue::Unsupported(_) => 0,
        }
    }

    /// Whether [`MatValue::len`] is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Copy)]
struct Endian {
    little: bool,
}

impl Endian {
    fn u32(self, b: &[u8]) -> u32 {
        let a: [u8; 4] = b[..4].try_into().expect("4 bytes");
        if self.little {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    }

    fn bytes<const N: usize>(self, b: &[u8]) -> [u8; N] {
        let mut a: [u8; N] = b[..N].try_into().expect("N bytes");
        if !self.little {
            a.reverse();
        }
        a
    }
}

/// One data element: its type and its data.
struct Element<'a> {
    kind: u32,
    data: &'a [u8],
}

/// Reads the element at `*pos` of `buf` and moves `*pos` past it (and its padding).
fn element<'a>(buf: &'a [u8], pos: &mut usize, e: Endian) -> Result<Element<'a>, String> {
    let at = *pos;
    if buf.len() - at < 8 {
        return Err(format!(
            "byte {at}: {} bytes left, too few for a data element tag (truncated?)",
            buf.len() - at
        ));
    }
    let first = e.u32(&buf[at..]);
    if first >> 16 != 0 {
        // Small data element: type and size in the first 4 bytes, data in the next 4.
        let n = (first >> 16) as usize;
        if n > 4 {
            return Err(format!(
                "byte {at}: small data element of {n} bytes, at most 4 fit"
            ));
        }
        *pos = at + 8;
        return Ok(Element {
            kind: first & 0xffff,
            data: &buf[at + 4..at + 4 + n],
        });
    }
    let n = e.u32(&buf[at + 4..]) as u64;
    let left = (buf.len() - at - 8) as u64;
    if n > left {
        return Err(format!(
            "byte {at}: data element claims {n} bytes, only {left} are left (truncated?)"
        ));
    }
    let end = at + 8 + n as usize;
    // Elements are padded to 8 bytes; compressed ones are not.
    *pos = if first == MI_COMPRESSED {
        end
    } else {
        (end.div_ceil(8) * 8).min(buf.len())
    };
    Ok(Element {
        kind: first,
        data: &buf[at + 8..end],
    })
}

fn inflate(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(data)
        .take(MAX_INFLATED_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("cannot inflate a compressed variable: {e}"))?;
    if out.len() as u64 > MAX_INFLATED_BYTES {
        return Err(format!(
            "a compressed variable inflates to more than {MAX_INFLATED_BYTES} bytes"
        ));
    }
    Ok(out)
}

/// The elements of numeric data of any type, as `f64`.
fn numbers(el: &Element, e: Endian) -> Result<Vec<f64>, String> {
    let size = match el.kind {
        MI_INT8 | MI_UINT8 | MI_UTF8 => 1,
        MI_INT16 | MI_UINT16 | MI_UTF16 => 2,
        MI_INT32 | MI_UINT32 | MI_SINGLE => 4,
        MI_DOUBLE | MI_INT64 | MI_UINT64 => 8,
        k => return Err(format!("numeric data of element type {k}")),
    };
    if !el.data.len().is_multiple_of(size) {
        return Err(format!(
            "{} bytes of element type {}, not a whole number of {size}-byte values",
            el.data.len(),
            el.kind
        ));
    }
    Ok(el
        .data
        .chunks_exact(size)
        .map(|c| match el.kind {
            MI_INT8 => c[0] as i8 as f64,
            MI_UINT8 | MI_UTF8 => c[0] as f64,
            MI_INT16 => i16::from_le_bytes(e.bytes(c)) as f64,
            MI_UINT16 | MI_UTF16 => u16::from_le_bytes(e.bytes(c)) as f64,
            MI_INT32 => i32::from_le_bytes(e.bytes(c)) as f64,
            MI_UINT32 => u32::from_le_bytes(e.bytes(c)) as f64,
            MI_SINGLE => f32::from_le_bytes(e.bytes(c)) as f64,
            MI_DOUBLE => f64::from_le_bytes(e.bytes(c)),
            MI_INT64 => i64::from_le_bytes(e.bytes(c)) as f64,
            _ => u64::from_le_bytes(e.bytes(c)) as f64,
        })
        .collect())
}

fn text_of(el: &Element) -> Result<String, String> {
    if el.kind != MI_INT8 && el.kind != MI_UINT8 {
        return Err(format!("a name of element type {}", el.kind));
    }
    Ok(el
        .data
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect())
}

/// Parses the contents of an `miMATRIX` element into its name and value.
fn matrix(data: &[u8], e: Endian, depth: usize) -> Result<(String, MatValue), String> {
    if depth > MAX_DEPTH {
        return Err(format!("arrays nested more than {MAX_DEPTH} deep"));
    }
    if data.is_empty() {
        // An empty array (as in an empty cell).
        return Ok((
            String::new(),
            MatValue::Numeric {
                dims: vec![0, 0],
                data: Vec::new(),
            },
        ));
    }
    let mut pos = 0;
    let flags = element(data, &mut pos, e)?;
    if flags.kind != MI_UINT32 || flags.data.len() != 8 {
        return Err("array flags are not 2 uint32 values".into());
    }
    let flag_word = e.u32(flags.data);
    let class = (flag_word & 0xff) as u8;
    let complex = flag_word & 0x0800 != 0;
    let dims_el = element(data, &mut pos, e)?;
    if dims_el.kind != MI_INT32 || dims_el.data.len() % 4 != 0 || dims_el.data.len() < 8 {
        return Err("array dimensions are not 2 or more int32 values".into());
    }
    let mut dims = Vec::new();
    let mut count: usize = 1;
    for c in dims_el.data.chunks_exact(4) {
        let d = i32::from_le_bytes(e.bytes(c));
        if d < 0 {
            return Err(format!("negative array dimension {d}"));
        }
        dims.push(d as usize);
        count = count
            .checked_mul(d as usize)
            .ok_or("array dimensions overflow")?;
    }
    let name = text_of(&element(data, &mut pos, e)?)?;
    let value = match class {
        1 | 2 => {
            let fields = if class == 2 {
                let len_el = element(data, &mut pos, e)?;
                let len = match numbers(&len_el, e)?.as_slice() {
                    [l] if *l >= 1.0 && *l <= 1024.0 => *l as usize,
                    _ => return Err("bad struct field name length".into()),
                };
                let names_el = element(data, &mut pos, e)?;
                if names_el.data.len() % len != 0 {
                    return Err("struct field names do not fill whole slots".into());
                }
                names_el
                    .data
                    .chunks(len)
                    .map(|c| {
                        text_of(&Element {
                            kind: MI_INT8,
                            data: c,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                Vec::new()
            };
            let per_item = fields.len().max(1);
            // Each item is at least an 8-byte tag: a count beyond that is malformed.
            if count.saturating_mul(per_item) > (data.len() - pos) / 8 {
                return Err(format!(
                    "{count} elements claimed, the array holds at most {}",
                    (data.len() - pos) / 8
                ));
            }
            let mut items = Vec::new();
            for _ in 0..count {
                let mut values = Vec::new();
                for _ in 0..per_item {
                    let el = element(data, &mut pos, e)?;
                    if el.kind != MI_MATRIX {
                        return Err(format!(
                            "an element of type {} in a cell or struct",
                            el.kind
                        ));
                    }
                    values.push(matrix(el.data, e, depth + 1)?.1);
                }
                items.push(values);
            }
            if class == 1 {
                MatValue::Cell {
                    dims,
                    items: items.into_iter().flatten().collect(),
                }
            } else {
                MatValue::Struct {
                    dims,
                    fields,
                    items,
                }
            }
        }
        4 => {
            let el = element(data, &mut pos, e)?;
            let chars: Vec<char> = if el.kind == MI_UTF8 {
                std::str::from_utf8(el.data)
                    .map_err(|_| "char data is not UTF-8".to_string())?
                    .chars()
                    .collect()
            } else {
                numbers(&el, e)?
                    .into_iter()
                    .map(|c| char::from_u32(c as u32).unwrap_or('\u{fffd}'))
                    .collect()
            };
            if chars.len() != count {
                return Err(format!(
                    "{} characters for {count} char array elements",
                    chars.len()
                ));
            }
            MatValue::Char { dims, chars }
        }
        6..=15 if !complex => {
            let el = element(data, &mut pos, e)?;
            let values = numbers(&el, e)?;
            if values.len() != count {
                return Err(format!(
                    "{} values for {count} array elements",
                    values.len()
                ));
            }
            MatValue::Numeric { dims, data: values }
        }
        c => MatValue::Unsupported(c),
    };
    Ok((name, value))
}

/// Reads a whole MAT-file into its variables, in file order.
pub fn read_mat(bytes: &[u8]) -> Result<Vec<(String, MatValue)>, String> {
    if bytes.starts_with(b"MATLAB 7.3") || bytes.get(512..516) == Some(b"\x89HDF") {
        return Err("a MATLAB 7.3 (HDF5) file: save it with -v7 or read it with h5py".into());
    }
    if bytes.len() < 128 {
        return Err(format!(
            "{} bytes, too short for a MAT-file header (128 bytes; truncated?)",
            bytes.len()
        ));
    }
    let e = match &bytes[126..128] {
        b"IM" => Endian { little: true },
        b"MI" => Endian { little: false },
        _ => return Err("no MAT-file version 5 header (not a .mat file, or MATLAB 4?)".into()),
    };
    let mut vars = Vec::new();
    let mut pos = 128;
    while pos < bytes.len() {
        let el = element(bytes, &mut pos, e)?;
        let inflated;
        let (kind, data) = if el.kind == MI_COMPRESSED {
            inflated = inflate(el.data)?;
            let mut p = 0;
            let inner = element(&inflated, &mut p, e)?;
            (inner.kind, inner.data)
        } else {
            (el.kind, el.data)
        };
        if kind == MI_MATRIX {
            vars.push(matrix(data, e, 0)?);
        }
    }
    Ok(vars)
}

/// The variable `name` of `vars`.
pub fn var<'a>(vars: &'a [(String, MatValue)], name: &str) -> Option<&'a MatValue> {
    vars.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A level-5 file holding the 1 x n double row `name` and the char row `t`, in either
    /// byte order, the char data as a small data element.
    fn file(little: bool, name: &str, values: &[f64]) -> Vec<u8> {
        let u32b = |v: u32| {
            if little {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            }
        };
        let mut v = vec![b' '; 124];
        v.extend_from_slice(&if little { [0, 1] } else { [1, 0] });
        v.extend_from_slice(if little { b"IM" } else { b"MI" });
        let tag = |b: &mut Vec<u8>, t: u32, n: usize| {
            b.extend_from_slice(&u32b(t));
            b.extend_from_slice(&u32b(n as u32));
        };
        let pad = |b: &mut Vec<u8>| b.resize(b.len().div_ceil(8) * 8, 0);
        let matrix = |class: u32, name: &str, n: usize, data: &dyn Fn(&mut Vec<u8>)| {
            let mut m = Vec::new();
            tag(&mut m, MI_UINT32, 8);
            m.extend_from_slice(&u32b(class));
            m.extend_from_slice(&[0; 4]);
            tag(&mut m, MI_INT32, 8);
            m.extend_from_slice(&u32b(1));
            m.extend_from_slice(&u32b(n as u32));
            tag(&mut m, MI_INT8, name.len());
            m.extend_from_slice(name.as_bytes());
            pad(&mut m);
            data(&mut m);
            m
        };
        let m = matrix(6, name, values.len(), &|m| {
            tag(m, MI_DOUBLE, values.len() * 8);
            for x in values {
                m.extend_from_slice(&if little {
                    x.to_le_bytes()
                } else {
                    x.to_be_bytes()
                });
            }
        });
        tag(&mut v, MI_MATRIX, m.len());
        v.extend(m);
        let m = matrix(4, "t", 2, &|m| {
            // Small data element: 4 bytes of two uint16 characters.
            m.extend_from_slice(&u32b((4 << 16) | MI_UINT16));
            for c in [b'o' as u16, b'k' as u16] {
                m.extend_from_slice(&if little {
                    c.to_le_bytes()
                } else {
                    c.to_be_bytes()
                });
            }
        });
        tag(&mut v, MI_MATRIX, m.len());
        v.extend(m);
        v
    }

    #[test]
    fn reads_both_byte_orders() {
        for little in [true, false] {
            let vars = read_mat(&file(little, "labels", &[1.0, 102.0, 7.5])).unwrap();
            assert_eq!(
                var(&vars, "labels").unwrap().numbers().unwrap(),
                &[1.0, 102.0, 7.5]
            );
            assert_eq!(var(&vars, "t").unwrap().text().as_deref(), Some("ok"));
        }
    }

    #[test]
    fn malformed_files_are_errors() {
        let good = file(true, "x", &[1.0, 2.0]);
        // The first variable ends at byte 208: cuts at 128 (no variables) and 208 (one) are
        // files of whole elements; every other cut is an error.
        assert_eq!(good.len(), 272);
        for n in 0..good.len() {
            let r = read_mat(&good[..n]);
            assert_eq!(r.is_ok(), n == 128 || n == 208, "{n}");
        }
        assert!(read_mat(b"MATLAB 7.3 MAT-file")
            .unwrap_err()
            .contains("HDF5"));
        // Dimensions that claim more elements than the data holds.
        let mut bad = good.clone();
        bad[128 + 8 + 16 + 12..128 + 8 + 16 + 16].copy_from_slice(&1000i32.to_le_bytes());
        let e = read_mat(&bad).unwrap_err();
        assert!(e.contains("2 values for 1000 array elements"), "{e}");
    }
}
