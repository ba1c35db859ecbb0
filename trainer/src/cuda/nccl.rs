//! The NCCL [`Collective`] of a multi-GPU run (feature `nccl`): one process per GPU, the
//! communicator made from the unique id rank 0 hands out at the rendezvous
//! ([`crate::dist::rendezvous`]).
//!
//! * Gradients ([`Collective::start_sum`]): a bucket's tensors are copied into one flat f32
//!   buffer on candle's stream, and the sum runs in place on NCCL's own stream, after an event
//!   that orders it behind those copies. Candle's stream goes on with the rest of the backward
//!   meanwhile (the overlap); [`PendingSum::wait`] makes candle's stream wait for the sum (on
//!   the device, not the host) and hands the sums back as views of the buffer, so the optimizer
//!   reads them only once they are complete.
//! * Host values (losses, evaluation counts, the weight checksum): small buffers summed or
//!   broadcast on NCCL's stream, then read back. Every NCCL call of the rank is on that one
//!   stream, so they run in the order every rank issues them.
//! * Faults: a watchdog thread follows every collective queued (an event after it). When one has
//!   not completed within the timeout (a rank died or hangs), or NCCL reports an asynchronous
//!   error (a peer's process exited, a network error), it aborts the communicator: the stuck
//!   kernels return, the host call waiting on the stream returns, and this rank's next collective
//!   fails with the reason. Other ranks see the aborted peer as an NCCL error and stop the same
//!   way, so every rank stops within about the timeout. `--resume` then continues from the last
//!   checkpoint.
//!
//! NCCL sums in its own order (ring or tree over the GPUs), so a multi-GPU run equals the
//! one-GPU run up to rounding, not bit for bit as the CPU [`crate::dist::ThreadGroup`] does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream, DevicePtrMut};
use candle_core::cuda_backend::cudarc::nccl::{result, sys};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{DType, Storage, Tensor};

use crate::dist::{Collective, DistError, PendingSum, Result};

/// The raw communicator, shared with the watchdog.
struct RawComm(sys::ncclComm_t);
// SAFETY: NCCL allows ncclCommAbort and ncclCommGetAsyncError from another thread than the one
// queueing collectives; every other call is made by the owning rank's thread.
unsafe impl Send for RawComm {}
unsafe impl Sync for RawComm {}

/// What the watchdog shares with the rank.
struct Watch {
    comm: RawComm,
    /// Collectives queued and not yet seen complete: their event, when queued, and what.
    pending: Mutex<Vec<(Arc<CudaEvent>, Instant, &'static str)>>,
    /// Set once the communicator is aborted, with the reason.
    failed: Mutex<Option<String>>,
    aborted: AtomicBool,
    stop: AtomicBool,
}

impl Watch {
    fn abort(&self, reason: String) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
            // SAFETY: the communicator is alive (freed only after the watchdog has stopped).
            let _ = unsafe { result::comm_abort(self.comm.0) };
        }
    }
}

fn nccl(e: impl std::fmt::Debug, what: &str) -> DistError {
    DistError::Unsupported(format!("NCCL {what}: {e:?}"))
}

/// NCCL over one GPU per rank.
pub struct Nccl {
    watch: Arc<Watch>,
    watchdog: Option<std::thread::JoinHandle<()>>,
    dev: CudaDevice,
    /// Candle's stream: the gradients are made and used there.
    compute: Arc<CudaStream>,
    /// NCCL's stream: every collective of this rank.
    side: super::SideStream,
    rank: usize,
    world: usize,
}

impl Nccl {
    /// A new unique id (rank 0 makes it and sends it to the others): 128 bytes.
    pub fn unique_id() -> Result<Vec<u8>> {
        let id = result::get_uniqueid().map_err(|e| nccl(e, "unique id"))?;
        Ok(id.internal.iter().map(|&c| c as u8).collect())
    }

    /// NCCL's version, e.g. `2.28.9`.
    pub fn version() -> Result<String> {
        let v = result::get_nccl_version().map_err(|e| nccl(e, "version"))?;
        Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
    }

    /// Joins the communicator of `world` ranks named by `token` (rank 0's unique id) as `rank`,
    /// on `dev`. A collective that does not complete within `timeout` aborts the communicator.
    pub fn new(
        dev: &CudaDevice,
        rank: usize,
        world: usize,
        token: &[u8],
        timeout: Duration,
    ) -> Result<Self> {
        if token.len() != 128 {
            return Err(DistError::Unsupported(format!(
                "NCCL: the rendezvous token has {} bytes, a unique id has 128",
                token.len()
            )));
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(token) {
            *d = *s as std::ffi::c_char;
        }
        let compute = dev.cuda_stream();
        compute
            .context()
            .bind_to_thread()
            .map_err(|e| nccl(e, "binding the device"))?;
        let side = super::SideStream::new(compute.context())?;
        let mut comm = std::ptr::null_mut();
        // SAFETY: an out-parameter; the id is rank 0's, the same on every rank.
        unsafe {
            result::comm_init_rank(
                &mut comm,
                world as i32,
                sys::ncclUniqueId { internal },
                rank as i32,
            )
        }
        .map_err(|e| {
            nccl(
                e,
                &format!(
                    "joining the communicator as rank {rank} of {world} (two ranks on one GPU? \
                     NCCL needs a GPU per rank)"
                ),
            )
        })?;
        let watch = Arc::new(Watch {
            comm: RawComm(comm),
            pending: Mutex::new(Vec::new()),
            failed: Mutex::new(None),
            aborted: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let w = watch.clone();
        let watchdog = std::thread::Builder::new()
            .name(format!("nccl-watchdog-{rank}"))
            .spawn(move || watchdog(&w, timeout))
            .map_err(|e| DistError::Unsupported(format!("NCCL watchdog thread: {e}")))?;
        Ok(Nccl {
            watch,
            watchdog: Some(watchdog),
            dev: dev.clone(),
            compute,
            side,
            rank,
            world,
        })
    }

    fn check(&self) -> Result<()> {
        if self.watch.aborted.load(Ordering::SeqCst) {
            let reason = self
                .watch
                .failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default();
            return Err(DistError::Unsupported(format!(
                "NCCL communicator aborted: {reason}"
            )));
        }
        Ok(())
    }

    /// Records an event after the collective just queued on NCCL's stream, for the watchdog;
    /// returns it.
    fn queued(&self, what: &'static str) -> Result<Arc<CudaEvent>> {
        let ev = Arc::new(
            self.side
                .stream
                .record_event(None)
                .map_err(|e| nccl(e, "recording an event"))?,
        );
        self.watch
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((ev.clone(), Instant::now(), what));
        Ok(ev)
    }

    /// `ncclAllReduce` (sum) in place over `count` values of `dtype` at `ptr`, on NCCL's stream;
    /// returns the event after it.
    fn all_reduce_raw(
        &self,
        ptr: u64,
        count: usize,
        dtype: sys::ncclDataType_t,
        what: &'static str,
    ) -> Result<Arc<CudaEvent>> {
        self.check()?;
        // SAFETY: `ptr` holds `count` values of `dtype` on this rank's device and stays alive
        // until the stream has passed this call (callers keep the buffer).
        unsafe {
            result::all_reduce(
                ptr as *const _,
                ptr as *mut _,
                count,
                dtype,
                sys::ncclRedOp_t::ncclSum,
                self.watch.comm.0,
                self.side.stream.cu_stream() as _,
            )
        }
        .map_err(|e| nccl(e, what))?;
        self.queued(what)
    }

    fn broadcast_raw(&self, ptr: u64, count: usize, root: usize) -> Result<()> {
        self.check()?;
        // SAFETY: as all_reduce_raw.
        unsafe {
            result::broadcast(
                ptr as *const _,
                ptr as *mut _,
                count,
                sys::ncclDataType_t::ncclUint8,
                root as i32,
                self.watch.comm.0,
                self.side.stream.cu_stream() as _,
            )
        }
        .map_err(|e| nccl(e, "broadcast"))?;
        self.queued("broadcast").map(|_| ())
    }
}

fn watchdog(w: &Watch, timeout: Duration) {
    while !w.stop.load(Ordering::SeqCst) && !w.aborted.load(Ordering::SeqCst) {
        let mut async_err = sys::ncclResult_t::ncclSuccess;
        // SAFETY: the communicator is alive while the watchdog runs.
        let r = unsafe { sys::ncclCommGetAsyncError(w.comm.0, &mut async_err) };
        if r != sys::ncclResult_t::ncclSuccess || async_err != sys::ncclResult_t::ncclSuccess {
            w.abort(format!(
                "NCCL reported {async_err:?} (another rank exited, or a network error)"
            ));
            break;
        }
        let overdue = {
            let mut pending = w.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.retain(|(ev, _, _)| !ev.is_complete());
            pending
                .first()
                .filter(|(_, t, _)| t.elapsed() >= timeout)
                .map(|(_, t, what)| (*what, t.elapsed()))
        };
        if let Some((what, waited)) = overdue {
            w.abort(format!(
                "the {what} queued {:.0} s ago has not completed (timeout {:.0} s): a rank died \
                 or hangs",
                waited.as_secs_f64(),
                timeout.as_secs_f64()
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        self.watch.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.watchdog.take() {
            let _ = h.join();
        }
        if !self.watch.aborted.load(Ordering::SeqCst) {
            // SAFETY: no collective is queued by this rank any more; the watchdog has stopped.
            let _ = self.side.stream.synchronize();
            let _ = unsafe { result::comm_destroy(self.watch.comm.0) };
        }
    }
}

fn f32_view(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.contiguous()?)
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        self.start_sum(tensors)?.wait()
    }

    fn start_sum(&mut self, tensors: &[Tensor]) -> Result<Box<dyn PendingSum>> {
        let total: usize = tensors.iter().map(Tensor::elem_count).sum();
        if total == 0 {
            return Ok(Box::new(crate::dist::Ready(tensors.to_vec())));
        }
        // One flat buffer, filled on candle's stream after the kernels that made the gradients.
        // SAFETY: every element is written by the copies below before the sum reads it.
        let mut flat =
            unsafe { self.compute.alloc::<f32>(total) }.map_err(|e| nccl(e, "bucket buffer"))?;
        let mut offset = 0;
        for t in tensors {
            let t = f32_view(t)?;
            let n = t.elem_count();
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else {
                return Err(DistError::Unsupported(
                    "NCCL all-reduce of a tensor that is not on the GPU".into(),
                ));
            };
            let src = cs.as_cuda_slice::<f32>()?;
            let start = layout.start_offset();
            self.compute
                .memcpy_dtod(
                    &src.slice(start..start + n),
                    &mut flat.slice_mut(offset..offset + n),
                )
                .map_err(|e| nccl(e, "bucket copy"))?;
            offset += n;
        }
        // NCCL's stream runs the sum once the copies are done; candle's stream goes on.
        let filled = self
            .compute
            .record_event(None)
            .map_err(|e| nccl(e, "recording an event"))?;
        self.side
            .stream
            .wait(&filled)
            .map_err(|e| nccl(e, "ordering the sum after the copies"))?;
        let ptr = {
            let (p, _sync) = flat.device_ptr_mut(&self.side.stream);
            p
        };
        let done = self.all_reduce_raw(
            ptr,
            total,
            sys::ncclDataType_t::ncclFloat32,
            "all-reduce of gradients",
        )?;
        let whole = Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(flat, self.dev.clone())),
            total,
            candle_core::op::BackpropOp::none(),
            false,
        );
        let mut views = Vec::with_capacity(tensors.len());
        let mut offset = 0;
        for t in tensors {
            let n = t.elem_count();
            views.push(whole.narrow(0, offset, n)?.reshape(t.shape())?);
            offset += n;
        }
        Ok(Box::new(NcclPending {
            views,
            done,
            compute: self.compute.clone(),
        }))
    }

    fn all_reduce_f64(&mut self, values: &mut [f64]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut buf = self
            .side
            .stream
            .clone_htod(values)
            .map_err(|e| nccl(e, "values upload"))?;
        let ptr = {
            let (p, _sync) = buf.device_ptr_mut(&self.side.stream);
            p
        };
        self.all_reduce_raw(
            ptr,
            values.len(),
            sys::ncclDataType_t::ncclFloat64,
            "all-reduce of values",
        )?;
        let host = self
            .side
            .stream
            .clone_dtoh(&buf)
            .map_err(|e| nccl(e, "values download"))?;
        self.check()?;
        values.copy_from_slice(&host);
        Ok(())
    }

    fn broadcast_bytes(&mut self, root: usize, bytes: &mut Vec<u8>) -> Result<()> {
        let mut len = [if self.rank == root {
            bytes.len() as f64
        } else {
            0.0
        }];
        // The root's length, as a sum (the others contribute 0).
        self.all_reduce_f64(&mut len)?;
        let n = len[0] as usize;
        bytes.resize(n, 0);
        if n == 0 {
            return Ok(());
        }
        let mut buf = self
            .side
            .stream
            .clone_htod(bytes.as_slice())
            .map_err(|e| nccl(e, "bytes upload"))?;
        let ptr = {
            let (p, _sync) = buf.device_ptr_mut(&self.side.stream);
            p
        };
        self.broadcast_raw(ptr, n, root)?;
        let host = self
            .side
            .stream
            .clone_dtoh(&buf)
            .map_err(|e| nccl(e, "bytes download"))?;
        self.check()?;
        bytes.copy_from_slice(&host);
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.all_reduce_f64(&mut [0.0])
    }

    fn abort(&mut self, reason: &str) {
        self.watch
            .abort(format!("rank {} stopped: {reason}", self.rank));
    }
}

/// A gradient bucket's sum in flight on NCCL's stream.
struct NcclPending {
    views: Vec<Tensor>,
    done: Arc<CudaEvent>,
    compute: Arc<CudaStream>,
}

impl PendingSum for NcclPending {
    fn wait(self: Box<Self>) -> Result<Vec<Tensor>> {
        // A device-side wait: kernels queued on candle's stream from now on (LAMB) run after
        // the sum; the buffer is freed on candle's stream, after them.
        self.compute
            .wait(&self.done)
            .map_err(|e| nccl(e, "ordering after the sum"))?;
        Ok(self.views)
    }
}
