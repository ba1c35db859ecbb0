//! Batches and the memory they live in.

use crossbeam_channel::Sender;

/// Memory a batch's images are written into: `Vec<u8>` here; the CUDA trainer supplies
/// page-locked buffers through the same trait.
pub trait HostStorage: Send + 'static {
    /// The bytes.
    fn bytes(&self) -> &[u8];
    /// The bytes, writable.
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl HostStorage for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

/// Any storage behind one type (heap or page-locked buffers in the same loader type).
impl HostStorage for Box<dyn HostStorage> {
    fn bytes(&self) -> &[u8] {
        (**self).bytes()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        (**self).bytes_mut()
    }
}

/// A sample left out of its batch under [`crate::OnCorrupt::Skip`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedSample {
    /// Index in the split.
    pub index: u32,
    /// What went wrong, naming shard, key and offset.
    pub error: String,
}

/// One batch: `len` images, u8 NHWC (`len x size x size x 3`, RGB), with their labels and
/// split indices. Dropping it returns its storage to the loader's pool; hold it for as long as
/// its memory is in use (for instance until an asynchronous copy has completed).
pub struct Batch<S: HostStorage = Vec<u8>> {
    /// Epoch.
    pub epoch: u64,
    /// Position of the batch in the epoch (for this rank).
    pub batch_id: usize,
    /// Images in the batch (less than the batch size for a last partial batch, or after skips).
    pub len: usize,
    /// Image side in pixels.
    pub size: u32,
    /// Class labels, `len` of them.
    pub labels: Vec<u32>,
    /// Split indices of the samples, `len` of them (for debugging and tests).
    pub indices: Vec<u32>,
    /// Samples skipped as corrupt under the skip policy.
    pub skipped: Vec<SkippedSample>,
    pub(crate) storage: Option<S>,
    pub(crate) home: Sender<S>,
}

impl<S: HostStorage> Batch<S> {
    /// A batch outside any loader (for tests and tools): `len` images of `size` px in
    /// `storage`, labelled `labels`; dropping it frees the storage. Panics if `storage` is
    /// smaller than the images or `labels` is not `len` long.
    pub fn detached(batch_id: usize, len: usize, size: u32, labels: Vec<u32>, storage: S) -> Self {
        assert!(
            storage.bytes().len() >= len * (size as usize).pow(2) * 3,
            "storage too small"
        );
        assert_eq!(labels.len(), len, "one label per image");
        // A pool nobody reads: the storage is dropped when the batch is.
        let (home, _) = crossbeam_channel::bounded(0);
        Batch {
            epoch: 0,
            batch_id,
            len,
            size,
            indices: (0..len as u32).collect(),
            labels,
            skipped: Vec::new(),
            storage: Some(storage),
            home,
        }
    }

    /// The images, `len * size * size * 3` bytes.
    pub fn images(&self) -> &[u8] {
        let n = self.len * (self.size as usize).pow(2) * 3;
        &self
            .storage
            .as_ref()
            .expect("storage present until drop")
            .bytes()[..n]
    }

    /// The images, writable (for example to mix them in place with
    /// [`crate::mix::mix_u8_batch`] before they are copied to the device).
    pub fn images_mut(&mut self) -> &mut [u8] {
        let n = self.len * (self.size as usize).pow(2) * 3;
        &mut self
            .storage
            .as_mut()
            .expect("storage present until drop")
            .bytes_mut()[..n]
    }

    /// The whole storage (for example to start a device copy from it).
    pub fn storage(&self) -> &S {
        self.storage.as_ref().expect("storage present until drop")
    }

    /// Image `i` (`size * size * 3` bytes).
    pub fn image(&self, i: usize) -> &[u8] {
        let n = (self.size as usize).pow(2) * 3;
        &self.images()[i * n..(i + 1) * n]
    }
}

impl<S: HostStorage> Drop for Batch<S> {
    fn drop(&mut self) {
        if let Some(s) = self.storage.take() {
            // The loader may be gone already; then the memory is simply freed.
            let _ = self.home.send(s);
        }
    }
}

impl<S: HostStorage> std::fmt::Debug for Batch<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("epoch", &self.epoch)
            .field("batch_id", &self.batch_id)
            .field("len", &self.len)
            .field("size", &self.size)
            .field("skipped", &self.skipped.len())
            .finish()
    }
}
