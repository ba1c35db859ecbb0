//! Per-op GPU time, for the benchmark's breakdown: CUDA events around each custom op, summed
//! by name. Off unless [`enable`]d (recording events costs a little on every call).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent, CudaStream};
use candle_core::cuda_backend::CudaDevice;

static ENABLED: AtomicBool = AtomicBool::new(false);
static RECORDS: Mutex<Vec<(&'static str, CudaEvent, CudaEvent)>> = Mutex::new(Vec::new());

/// Turns recording on or off (and drops what was recorded).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
    RECORDS.lock().expect("profile poisoned").clear();
}

/// True while recording.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A timed region on the device's stream; the end event is recorded on drop.
pub struct Scope {
    name: &'static str,
    stream: Arc<CudaStream>,
    start: Option<CudaEvent>,
}

/// Starts a timed region named `name`, or `None` when recording is off.
pub fn scope(dev: &CudaDevice, name: &'static str) -> Option<Scope> {
    if !enabled() {
        return None;
    }
    let stream = dev.cuda_stream();
    let start = stream
        .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .ok()?;
    Some(Scope {
        name,
        stream,
        start: Some(start),
    })
}

impl Drop for Scope {
    fn drop(&mut self) {
        let end = self
            .stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT));
        if let (Some(start), Ok(end)) = (self.start.take(), end) {
            RECORDS
                .lock()
                .expect("profile poisoned")
                .push((self.name, start, end));
        }
    }
}

/// Milliseconds and call counts per region name since [`enable`] (waits for the events).
pub fn summary() -> BTreeMap<&'static str, (f64, usize)> {
    let records = std::mem::take(&mut *RECORDS.lock().expect("profile poisoned"));
    let mut out: BTreeMap<&'static str, (f64, usize)> = BTreeMap::new();
    for (name, start, end) in records {
        if let Ok(ms) = start.elapsed_ms(&end) {
            let e = out.entry(name).or_default();
            e.0 += ms as f64;
            e.1 += 1;
        }
    }
    out
}
