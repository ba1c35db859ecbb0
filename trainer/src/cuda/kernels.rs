//! Compiling and loading our CUDA C kernels.
//!
//! Sources are plain CUDA C strings compiled at run time with NVRTC (no build-time nvcc, and the
//! `nvrtc_compiles_every_module` test checks them on a machine without a GPU). bf16 values are
//! handled as raw `unsigned short` bits with the conversions in [`PRELUDE`], so no CUDA header is
//! needed. Each module is compiled once per process; candle's device caches the loaded module.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaStream, LaunchArgs, LaunchConfig,
};
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

/// Loaded functions by (device ordinal, module, function): one hash lookup per launch.
type FuncCache = Mutex<HashMap<(usize, &'static str, &'static str), CudaFunction>>;

fn func_cache() -> &'static FuncCache {
    static CACHE: OnceLock<FuncCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Compiles `module` to PTX with NVRTC (cached per process).
pub fn ptx(module: Module) -> Result<Arc<str>> {
    let mut cache = ptx_cache().lock().expect("ptx cache poisoned");
    if let Some(p) = cache.get(module.name) {
        return Ok(p.clone());
    }
    let src = format!("{PRELUDE}\n{}", module.source);
    let opts = candle_core::cuda_backend::cudarc::nvrtc::CompileOptions {
        // No `--use_fast_math`: the reductions and rsqrt must match the CPU within stated
        // tolerances; fused multiply-add stays on (the default).
        name: Some(format!("{}.cu", module.name)),
        ..Default::default()
    };
    let ptx = candle_core::cuda_backend::cudarc::nvrtc::compile_ptx_with_opts(&src, opts).map_err(
        |e| {
            Error::Msg(format!(
                "nvrtc: compiling kernel module {}: {e:?}",
                module.name
            ))
        },
    )?;
    let text: Arc<str> = ptx.to_src().into();
    cache.insert(module.name, text.clone());
    Ok(text)
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

/// The function `name` of `module` on `dev`, compiling and loading the module on first use.
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
    let ptx = ptx(module)?;
    let func = dev
        .get_or_load_custom_func(name, module.name, &ptx)?
        .into_cuda_function();
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
