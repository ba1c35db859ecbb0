//! Compiling and loading our CUDA C kernels.
//!
//! Sources are plain CUDA C strings compiled at run time with NVRTC (no build-time nvcc, and the
//! `nvrtc_compiles_every_module` test checks them on a machine without a GPU). bf16 values are
//! handled as raw `unsigned short` bits with the conversions in [`PRELUDE`], so no CUDA header is
//! needed.
//!
//! Each module is compiled for the device's own architecture (`sm_XY` from its compute
//! capability) to machine code (CUBIN), so the driver loads it as is: PTX would be compiled again
//! by the driver's JIT at every module load, in a PTX version that follows the NVRTC library the
//! process found. The CUBIN is kept in the [`crate::disk_cache`] under a key of the source, the
//! architecture and the NVRTC version, so a second process loads it without compiling. Should
//! NVRTC not know the device's architecture (a GPU newer than the library), the module is
//! compiled to PTX for the driver to JIT, and [`build_info`] says so.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchArgs, LaunchConfig,
};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{Error, Result};

/// Helpers every module starts with: bf16 <-> f32 (round to nearest even, NaN kept).
pub const PRELUDE: &str = r#"
typedef unsigned short bf16;
typedef unsigned char u8;
__device__ __forceinline__ float bf2f(bf16 v) { return __uint_as_float(((unsigned int)v) << 16); }
__device__ __forceinline__ bf16 f2bf(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}
// V bf16 values (V u8 values) aligned to their size, for one 2V-byte (V-byte) access: with
// V = 8, 16-byte loads and stores.
template <int V> struct alignas(2 * V) BfVec { bf16 h[V]; };
template <int V> struct alignas(V) U8Vec { u8 b[V]; };
template <int V> __device__ __forceinline__ void load_bf(const bf16* p, float* out) {
    BfVec<V> v = *(const BfVec<V>*)p;
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = bf2f(v.h[j]);
}
template <int V> __device__ __forceinline__ void store_bf(bf16* p, const float* in) {
    BfVec<V> v;
#pragma unroll
    for (int j = 0; j < V; ++j) v.h[j] = f2bf(in[j]);
    *(BfVec<V>*)p = v;
}
"#;

/// One kernel module: a name unique in the process and its source (without [`PRELUDE`]).
#[derive(Clone, Copy, Debug)]
pub struct Module {
    /// Module name (key of the PTX cache and of candle's module cache).
    pub name: &'static str,
    /// CUDA C source.
    pub source: &'static str,
}

fn ptx_cache() -> &'static Mutex<HashMap<&'static str, Arc<str>>> {
    static CACHE: OnceLock<Mutex<HashMap<&'static str, Arc<str>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Loaded modules by (device ordinal, module), and how each was built.
type ModuleCache = Mutex<HashMap<(usize, &'static str), (Arc<CudaModule>, Built)>>;

fn module_cache() -> &'static ModuleCache {
    static CACHE: OnceLock<ModuleCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Loaded functions by (device ordinal, module, function): one hash lookup per launch.
type FuncCache = Mutex<HashMap<(usize, &'static str, &'static str), CudaFunction>>;

fn func_cache() -> &'static FuncCache {
    static CACHE: OnceLock<FuncCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// How a loaded module was built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Built {
    /// Machine code for `sm_XY`, compiled now or read from the disk cache.
    Cubin {
        /// The architecture, e.g. `sm_90`.
        arch: String,
        /// True when read from the disk cache.
        cached: bool,
    },
    /// PTX for the driver to JIT, with the reason the CUBIN could not be made.
    Ptx {
        /// Why not machine code.
        reason: String,
    },
}

/// The NVRTC library's version `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters.
    let r = unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Msg(format!("nvrtc: version query: {r:?}")));
    }
    Ok((major, minor))
}

/// The program log of `prog` as text.
fn program_log(prog: nvrtc::sys::nvrtcProgram) -> String {
    // SAFETY: `prog` is a live program.
    match unsafe { nvrtc::result::get_program_log(prog) } {
        Ok(log) => log
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8 as char)
            .collect(),
        Err(e) => format!("(no log: {e:?})"),
    }
}

/// Compiles `module` with NVRTC for `arch` (`sm_XY`) to machine code.
pub fn cubin(module: Module, arch: &str) -> Result<Vec<u8>> {
    let src = std::ffi::CString::new(format!("{PRELUDE}\n{}", module.source))
        .map_err(|e| Error::Msg(format!("nvrtc: module {}: {e}", module.name)))?;
    let name = std::ffi::CString::new(format!("{}.cu", module.name)).expect("no NUL in names");
    let prog = nvrtc::result::create_program(&src, Some(&name))
        .map_err(|e| Error::Msg(format!("nvrtc: creating module {}: {e:?}", module.name)))?;
    // No `--use_fast_math`: the reductions and rsqrt must match the CPU within stated
    // tolerances; fused multiply-add stays on (the default).
    let opts = [format!("--gpu-architecture={arch}")];
    // SAFETY: `prog` was created above and is destroyed below, after its last use.
    let result = unsafe {
        match nvrtc::result::compile_program(prog, &opts) {
            Err(e) => Err(Error::Msg(format!(
                "nvrtc: compiling kernel module {} for {arch}: {e:?}\n{}",
                module.name,
                program_log(prog)
            ))),
            Ok(()) => {
                let mut size = 0usize;
                let r = nvrtc::sys::nvrtcGetCUBINSize(prog, &mut size);
                let mut bin = vec![0u8; size];
                let r2 = if r == nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
                    nvrtc::sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut _)
                } else {
                    r
                };
                if r2 == nvrtc::sys::nvrtcResult::NVRTC_SUCCESS && size > 0 {
                    Ok(bin)
                } else {
                    Err(Error::Msg(format!(
                        "nvrtc: module {} for {arch}: no CUBIN ({r2:?})",
                        module.name
                    )))
                }
            }
        }
    };
    // SAFETY: created above, not used after this.
    let _ = unsafe { nvrtc::result::destroy_program(prog) };
    result
}

/// Compiles `module` to PTX with NVRTC (no architecture: NVRTC's default virtual one; cached per
/// process). The fallback when no CUBIN can be made, and what the no-GPU test checks.
pub fn ptx(module: Module) -> Result<Arc<str>> {
    let mut cache = ptx_cache().lock().expect("ptx cache poisoned");
    if let Some(p) = cache.get(module.name) {
        return Ok(p.clone());
    }
    let src = format!("{PRELUDE}\n{}", module.source);
    let opts = nvrtc::CompileOptions {
        name: Some(format!("{}.cu", module.name)),
        ..Default::default()
    };
    let ptx = nvrtc::compile_ptx_with_opts(&src, opts).map_err(|e| {
        Error::Msg(format!(
            "nvrtc: compiling kernel module {}: {e:?}",
            module.name
        ))
    })?;
    let text: Arc<str> = ptx.to_src().into();
    cache.insert(module.name, text.clone());
    Ok(text)
}

/// The `sm_XY` name of the context's device.
pub fn device_arch(ctx: &CudaContext) -> Result<String> {
    let (major, minor) = ctx.compute_capability().map_err(Error::wrap)?;
    Ok(format!("sm_{major}{minor}"))
}

/// The disk-cache entry of `module`'s CUBIN for `arch`: keyed by the full source, the
/// architecture and the NVRTC version.
fn cubin_entry(module: Module, arch: &str, nvrtc: (i32, i32)) -> String {
    let key = crate::disk_cache::hash_hex(&[
        PRELUDE.as_bytes(),
        module.source.as_bytes(),
        arch.as_bytes(),
        format!("{}.{}", nvrtc.0, nvrtc.1).as_bytes(),
    ]);
    format!("kernels/{}-{arch}-{key}.cubin", module.name)
}

/// `module` built for `ctx`'s device: the cached or freshly compiled CUBIN, else PTX.
fn build(ctx: &Arc<CudaContext>, module: Module) -> Result<(Arc<CudaModule>, Built)> {
    let cache = crate::disk_cache::DiskCache::global();
    let attempt = || -> Result<(Arc<CudaModule>, Built)> {
        let arch = device_arch(ctx)?;
        let entry = cubin_entry(module, &arch, nvrtc_version()?);
        if let Some(bin) = cache.read(&entry) {
            if let Ok(m) = ctx.load_module(nvrtc::Ptx::from_binary(bin)) {
                return Ok((m, Built::Cubin { arch, cached: true }));
            }
        }
        let bin = cubin(module, &arch)?;
        let m = ctx
            .load_module(nvrtc::Ptx::from_binary(bin.clone()))
            .map_err(|e| {
                Error::Msg(format!(
                    "loading the {arch} CUBIN of {}: {e:?}",
                    module.name
                ))
            })?;
        cache.write(&entry, &bin);
        Ok((
            m,
            Built::Cubin {
                arch,
                cached: false,
            },
        ))
    };
    match attempt() {
        Ok(r) => Ok(r),
        Err(e) => {
            let m = ctx
                .load_module(nvrtc::Ptx::from_src(ptx(module)?.to_string()))
                .map_err(|e| Error::Msg(format!("loading the PTX of {}: {e:?}", module.name)))?;
            Ok((
                m,
                Built::Ptx {
                    reason: e.to_string(),
                },
            ))
        }
    }
}

/// The loaded `module` on `stream`'s device (built on first use).
fn loaded(stream: &CudaStream, module: Module) -> Result<Arc<CudaModule>> {
    let key = (stream.context().ordinal(), module.name);
    let mut cache = module_cache().lock().expect("module cache poisoned");
    if let Some((m, _)) = cache.get(&key) {
        return Ok(m.clone());
    }
    let (m, built) = build(stream.context(), module)?;
    cache.insert(key, (m.clone(), built));
    Ok(m)
}

/// How the modules loaded so far on `dev` were built, one `name: how` per module, sorted.
pub fn build_info(dev: &CudaDevice) -> String {
    let ordinal = dev.cuda_stream().context().ordinal();
    let cache = module_cache().lock().expect("module cache poisoned");
    let mut parts: Vec<String> = cache
        .iter()
        .filter(|((o, _), _)| *o == ordinal)
        .map(|((_, name), (_, built))| match built {
            Built::Cubin { arch, cached } => {
                format!(
                    "{name}: {arch} cubin{}",
                    if *cached { " (cached)" } else { "" }
                )
            }
            Built::Ptx { reason } => format!("{name}: PTX, JIT by the driver ({reason})"),
        })
        .collect();
    parts.sort();
    parts.join("; ")
}

/// A loaded kernel and the stream it launches on (candle's stream of the device).
pub struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    /// Starts a launch: push the arguments in order (`.arg(&x)`), then
    /// `unsafe { b.launch(cfg) }`.
    pub fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// The function `name` of `module` on `dev`, building and loading the module on first use.
pub fn func(dev: &CudaDevice, module: Module, name: &'static str) -> Result<Kernel> {
    let stream = dev.cuda_stream();
    let key = (stream.context().ordinal(), module.name, name);
    if let Some(f) = func_cache()
        .lock()
        .expect("kernel cache poisoned")
        .get(&key)
    {
        return Ok(Kernel {
            func: f.clone(),
            stream,
        });
    }
    let func = loaded(&stream, module)?
        .load_function(name)
        .map_err(|e| Error::Msg(format!("kernel {name} of {}: {e:?}", module.name)))?;
    func_cache()
        .lock()
        .expect("kernel cache poisoned")
        .insert(key, func.clone());
    Ok(Kernel { func, stream })
}

/// A 1-D launch over `n` items with `threads` per block.
pub fn grid_1d(n: usize, threads: u32) -> LaunchConfig {
    let blocks = n.div_ceil(threads as usize).max(1) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}
