//! Batches on their way to the device: copies that run ahead of the step that uses them, and
//! host buffers that go back to the loader only once their copy has completed.
//!
//! The pieces, all device-independent:
//!
//! - [`CopyFence`]: "has this copy completed?" without blocking, and a blocking wait. On CUDA it
//!   is an event recorded on the copy stream after the copy (`trainer::cuda::feed`); a
//!   synchronous copy's fence is [`Completed`].
//! - [`InFlight`]: the host buffers whose copies may still be running, each held with its fence
//!   and released (dropped, which returns a [`loader::Batch`]'s buffer to the loader's pool) in
//!   order, only after its fence completes. At most `capacity` are held: pushing one more
//!   waits for the oldest.
//! - [`Upload`]: what the training loop calls, first in first out: `start` a batch's copy (and
//!   its Mixup/CutMix) as soon as the loader delivers it, then, a step later, take the model
//!   input of the oldest started batch with `next_images`. [`HostUpload`] is the CPU version;
//!   the CUDA one is `trainer::cuda::feed::CudaUpload`.
//!
//! The training loop starts the copy of micro-batch k+1 while the device still works on
//! micro-batch k, so on a GPU the copy overlaps compute and the step never waits for it.

use std::collections::VecDeque;
use std::time::Instant;

use candle_core::{bail, Result, Tensor};
use loader::mix::{mix_u8_batch, MixDraw, MixKind};
use loader::{Batch, HostStorage};

use crate::feed::Feed;
use crate::model::ActivationLayout;

/// Completion of one asynchronous host-to-device copy.
pub trait CopyFence {
    /// Whether the copy has completed (never blocks). An error is a failed copy or device.
    fn is_complete(&self) -> Result<bool>;
    /// Blocks until the copy has completed.
    fn wait(&self) -> Result<()>;
}

/// The fence of a copy that had completed before its call returned (host memory, CPU device).
#[derive(Clone, Copy, Debug, Default)]
pub struct Completed;

impl CopyFence for Completed {
    fn is_complete(&self) -> Result<bool> {
        Ok(true)
    }
    fn wait(&self) -> Result<()> {
        Ok(())
    }
}

/// Items (host batches) held until the copies reading them have completed, released in the
/// order they were pushed. Dropping an item releases it (a [`loader::Batch`] returns its buffer
/// to the loader's pool), so an item is never released while its copy may still read it: not
/// by [`InFlight::push`], not by [`InFlight::release_completed`], and not when the queue itself
/// is dropped (which waits for every fence first).
pub struct InFlight<T, F: CopyFence> {
    queue: VecDeque<(T, F)>,
    capacity: usize,
    wait_s: f64,
}

impl<T, F: CopyFence> InFlight<T, F> {
    /// An empty queue holding at most `capacity` items (at least 1).
    pub fn new(capacity: usize) -> Self {
        InFlight {
            queue: VecDeque::with_capacity(capacity.max(1)),
            capacity: capacity.max(1),
            wait_s: 0.0,
        }
    }

    /// Holds `item` until `fence` completes. Completed items at the front are released first;
    /// if the queue is still full, this blocks on the oldest fence (the time counts in
    /// [`InFlight::take_wait_s`]).
    pub fn push(&mut self, item: T, fence: F) -> Result<()> {
        self.release_completed()?;
        while self.queue.len() >= self.capacity {
            let t = Instant::now();
            let waited = self.queue.front().map(|(_, f)| f.wait());
            self.wait_s += t.elapsed().as_secs_f64();
            waited.transpose()?;
            self.queue.pop_front();
        }
        self.queue.push_back((item, fence));
        Ok(())
    }

    /// Releases the items at the front whose fences have completed, stopping at the first that
    /// has not (copies on one stream complete in order). Returns how many were released.
    pub fn release_completed(&mut self) -> Result<usize> {
        let mut n = 0;
        while let Some((_, fence)) = self.queue.front() {
            if !fence.is_complete()? {
                break;
            }
            self.queue.pop_front();
            n += 1;
        }
        Ok(n)
    }

    /// Waits for every fence and releases every item, oldest first.
    pub fn drain(&mut self) -> Result<()> {
        while let Some((_, fence)) = self.queue.front() {
            let t = Instant::now();
            let waited = fence.wait();
            self.wait_s += t.elapsed().as_secs_f64();
            waited?;
            self.queue.pop_front();
        }
        Ok(())
    }

    /// Items held.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The most items held at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Seconds spent blocked on fences since the last call.
    pub fn take_wait_s(&mut self) -> f64 {
        std::mem::take(&mut self.wait_s)
    }
}

impl<T, F: CopyFence> Drop for InFlight<T, F> {
    fn drop(&mut self) {
        while let Some((item, fence)) = self.queue.pop_front() {
            if fence.wait().is_err() {
                // The copy's state is unknown (a failed device): leak the buffer rather than
                // hand memory that a copy may still read back to the loader or the allocator.
                std::mem::forget(item);
            }
        }
    }
}

/// The loader's buffers as the training loop sees them: heap memory on the CPU, page-locked
/// memory on CUDA, behind one type so the loop is the same for both.
pub type DynStorage = Box<dyn HostStorage>;

/// Moves host batches to the device as model input, first in first out.
pub trait Upload {
    /// Starts the copy of `batch`'s images to the device, to be mixed by `draw` (pass a draw of
    /// kind [`MixKind::None`] to leave them as they are). The batch is held (its buffer kept
    /// from the loader) until the copy has completed.
    fn start(&mut self, batch: Batch<DynStorage>, draw: &MixDraw) -> Result<()>;

    /// The model input of the oldest started batch, normalised (and mixed), in the model's
    /// `layout` (the dtype rule of [`Feed::images_for`]).
    ///
    /// # Shapes
    /// `[n, 3, size, size]` f32 for [`ActivationLayout::Nchw`]; `[n, size, size, 3]` for
    /// [`ActivationLayout::Nhwc`], bf16 on CUDA and f32 on the CPU; `n` the batch's length.
    fn next_images(&mut self, layout: ActivationLayout) -> Result<Tensor>;

    /// Seconds the host spent blocked on copy completion since the last call.
    fn take_wait_s(&mut self) -> f64;

    /// Batches started and not yet taken by [`Upload::next_images`].
    fn pending(&self) -> usize;
}

/// The CPU upload: there is no asynchronous copy. Mixup/CutMix run on the u8 images in the
/// loader's buffer ([`mix_u8_batch`], timm's `FastCollateMixup`) when the batch is started;
/// [`Feed::images_for`] makes the model input when it is taken, and the buffer goes back to
/// the loader then.
pub struct HostUpload {
    feed: Feed,
    started: VecDeque<Batch<DynStorage>>,
}

impl HostUpload {
    /// An upload through `feed` (which decides the device).
    pub fn new(feed: Feed) -> Self {
        HostUpload {
            feed,
            started: VecDeque::new(),
        }
    }
}

impl Upload for HostUpload {
    fn start(&mut self, mut batch: Batch<DynStorage>, draw: &MixDraw) -> Result<()> {
        let (n, size) = (batch.len, batch.size as usize);
        if draw.kind != MixKind::None {
            // In place, in the loader's buffer: the batch is ours until dropped.
            mix_u8_batch(batch.images_mut(), n, size, size, 3, draw);
        }
        self.started.push_back(batch);
        Ok(())
    }

    fn next_images(&mut self, layout: ActivationLayout) -> Result<Tensor> {
        let Some(batch) = self.started.pop_front() else {
            bail!("upload: next_images without a started batch")
        };
        let (n, size) = (batch.len, batch.size as usize);
        self.feed.images_for(batch.images(), n, size, layout)
    }

    fn take_wait_s(&mut self) -> f64 {
        0.0
    }

    fn pending(&self) -> usize {
        self.started.len()
    }
}

/// Batches a training loop holds beyond the loader's own pool: the prefetched one, plus one
/// whose copy may not have been seen complete yet.
pub const EXTRA_BUFFERS: usize = 2;

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;
    use std::sync::mpsc;

    /// A fence the test completes by hand; `wait` completes it (as the device would, in time)
    /// and counts the waits.
    #[derive(Clone)]
    struct TestFence {
        done: Rc<Cell<bool>>,
        waits: Rc<Cell<usize>>,
        fail: bool,
    }

    impl TestFence {
        fn new() -> Self {
            TestFence {
                done: Rc::new(Cell::new(false)),
                waits: Rc::new(Cell::new(0)),
                fail: false,
            }
        }
        fn complete(&self) {
            self.done.set(true);
        }
    }

    impl CopyFence for TestFence {
        fn is_complete(&self) -> Result<bool> {
            if self.fail {
                bail!("copy failed");
            }
            Ok(self.done.get())
        }
        fn wait(&self) -> Result<()> {
            if self.fail {
                bail!("copy failed");
            }
            self.waits.set(self.waits.get() + 1);
            self.done.set(true);
            Ok(())
        }
    }

    /// Stands in for a batch: dropping it "returns the buffer" by sending its id home.
    struct Buffer {
        id: usize,
        home: mpsc::Sender<usize>,
    }

    impl Drop for Buffer {
        fn drop(&mut self) {
            let _ = self.home.send(self.id);
        }
    }

    fn returned(rx: &mpsc::Receiver<usize>) -> Vec<usize> {
        rx.try_iter().collect()
    }

    #[test]
    fn buffers_wait_for_their_fence_and_return_in_order() -> Result<()> {
        let (tx, rx) = mpsc::channel();
        let mut q = InFlight::new(4);
        let fences: Vec<TestFence> = (0..3).map(|_| TestFence::new()).collect();
        for (id, f) in fences.iter().enumerate() {
            q.push(
                Buffer {
                    id,
                    home: tx.clone(),
                },
                f.clone(),
            )?;
        }
        assert_eq!(q.release_completed()?, 0);
        assert!(
            returned(&rx).is_empty(),
            "nothing completed, nothing returned"
        );
        // A later copy completing first does not overtake the earlier one.
        fences[1].complete();
        assert_eq!(q.release_completed()?, 0);
        assert!(returned(&rx).is_empty());
        fences[0].complete();
        assert_eq!(q.release_completed()?, 2);
        assert_eq!(returned(&rx), vec![0, 1]);
        assert_eq!(q.len(), 1);
        fences[2].complete();
        assert_eq!(q.release_completed()?, 1);
        assert_eq!(returned(&rx), vec![2]);
        assert!(q.is_empty());
        assert!(
            fences.iter().all(|f| f.waits.get() == 0),
            "no blocking wait"
        );
        Ok(())
    }

    #[test]
    fn a_full_queue_waits_for_the_oldest_copy() -> Result<()> {
        let (tx, rx) = mpsc::channel();
        let mut q = InFlight::new(2);
        let fences: Vec<TestFence> = (0..4).map(|_| TestFence::new()).collect();
        q.push(
            Buffer {
                id: 0,
                home: tx.clone(),
            },
            fences[0].clone(),
        )?;
        q.push(
            Buffer {
                id: 1,
                home: tx.clone(),
            },
            fences[1].clone(),
        )?;
        assert!(returned(&rx).is_empty());
        // The third push blocks on the first fence only.
        q.push(
            Buffer {
                id: 2,
                home: tx.clone(),
            },
            fences[2].clone(),
        )?;
        assert_eq!(returned(&rx), vec![0]);
        assert_eq!(fences[0].waits.get(), 1);
        assert_eq!(fences[1].waits.get(), 0);
        assert_eq!(q.len(), 2);
        // A completed one is released without waiting.
        fences[1].complete();
        q.push(
            Buffer {
                id: 3,
                home: tx.clone(),
            },
            fences[3].clone(),
        )?;
        assert_eq!(returned(&rx), vec![1]);
        assert_eq!(fences[2].waits.get(), 0);
        assert!(q.len() <= q.capacity());
        q.drain()?;
        assert_eq!(returned(&rx), vec![2, 3]);
        assert_eq!(fences[2].waits.get() + fences[3].waits.get(), 2);
        Ok(())
    }

    #[test]
    fn dropping_the_queue_waits_for_every_copy() {
        let (tx, rx) = mpsc::channel();
        let fences: Vec<TestFence> = (0..3).map(|_| TestFence::new()).collect();
        {
            let mut q = InFlight::new(3);
            for (id, f) in fences.iter().enumerate() {
                q.push(
                    Buffer {
                        id,
                        home: tx.clone(),
                    },
                    f.clone(),
                )
                .unwrap();
            }
        }
        assert_eq!(returned(&rx), vec![0, 1, 2]);
        assert!(fences.iter().all(|f| f.waits.get() == 1));
    }

    #[test]
    fn fence_errors_propagate_and_keep_the_buffer() {
        let (tx, rx) = mpsc::channel();
        let mut q = InFlight::new(1);
        let mut bad = TestFence::new();
        bad.fail = true;
        q.push(
            Buffer {
                id: 0,
                home: tx.clone(),
            },
            bad,
        )
        .unwrap();
        let e = q.release_completed().unwrap_err();
        assert!(e.to_string().contains("copy failed"), "{e}");
        let e = q
            .push(
                Buffer {
                    id: 1,
                    home: tx.clone(),
                },
                TestFence::new(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("copy failed"), "{e}");
        assert!(q.drain().is_err());
        drop(q);
        // Buffer 1 was never queued (dropped by the failed push); buffer 0's copy state is
        // unknown, so it is never handed back.
        assert_eq!(returned(&rx), vec![1]);
    }

    #[test]
    fn the_host_upload_is_first_in_first_out_and_mixes_like_the_loader() -> Result<()> {
        use loader::mix::CutBox;
        let feed = Feed::new(&candle_core::Device::Cpu)?;
        let mut up = HostUpload::new(feed.clone());
        let (n, s) = (4usize, 3usize);
        let bytes: Vec<u8> = (0..n * s * s * 3).map(|i| (i * 37 % 251) as u8).collect();
        let draws = [
            MixDraw {
                lam: 0.3,
                kind: MixKind::Mixup,
            },
            MixDraw {
                lam: 0.5,
                kind: MixKind::CutMix(CutBox {
                    y0: 0,
                    y1: 2,
                    x0: 1,
                    x1: 3,
                }),
            },
            MixDraw {
                lam: 1.0,
                kind: MixKind::None,
            },
        ];
        for (k, d) in draws.iter().enumerate() {
            let storage = Box::new(bytes.clone()) as DynStorage;
            let b = Batch::detached(k, n, s as u32, vec![k as u32; n], storage);
            up.start(b, d)?;
        }
        assert_eq!(up.pending(), 3);
        for (k, d) in draws.iter().enumerate() {
            let mut want = bytes.clone();
            mix_u8_batch(&mut want, n, s, s, 3, d);
            let layout = if k % 2 == 0 {
                ActivationLayout::Nchw
            } else {
                ActivationLayout::Nhwc
            };
            let want = feed.images_for(&want, n, s, layout)?;
            let got = up.next_images(layout)?;
            assert_eq!(got.dims(), want.dims());
            let want = want.flatten_all()?.to_vec1::<f32>()?;
            let got = got.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(got, want, "{d:?}");
        }
        assert_eq!(up.pending(), 0);
        assert!(up.next_images(ActivationLayout::Nchw).is_err());
        Ok(())
    }
}
