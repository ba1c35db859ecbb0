//! Stopping a run cleanly on a signal (preemption: Slurm sends SIGTERM before it kills a job).
//!
//! [`install_signal_handlers`] (the `train` program calls it) makes the first SIGTERM or SIGINT
//! a request: the run finishes its current update, writes a checkpoint and a metrics line
//! saying why it stopped, and returns with [`super::TrainSummary::stopped_by`] set (`train`
//! then exits with [`EXIT_STOPPED`]). A second signal exits at once with `128 + signal`, as a
//! shell reports a killed process; checkpoints are written under temporary names and renamed
//! when complete, so the last complete one stays valid.
//!
//! The training loop reads a [`StopSource`]: the process's signals, a flag of its own (tests, or
//! a program embedding the trainer), or nothing. With several ranks the request is agreed on at
//! a metrics line (its collective carries each rank's flag), so every rank stops after the same
//! update.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

/// Exit code of `train` after a clean stop on a signal (sysexits' `EX_TEMPFAIL`: try again
/// later; `--resume` continues the run).
pub const EXIT_STOPPED: i32 = 75;

/// The first signal received (0: none).
static PROCESS_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    // Only async-signal-safe work here: an atomic swap and _exit.
    if PROCESS_SIGNAL.swap(signal, Ordering::SeqCst) != 0 {
        // SAFETY: _exit(2) is async-signal-safe; it ends the process without unwinding.
        unsafe { libc::_exit(128 + signal) }
    }
}

/// Makes SIGTERM and SIGINT stop requests for [`StopSource::Process`] (see the module docs).
pub fn install_signal_handlers() -> std::io::Result<()> {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is valid; the handler only touches an atomic and calls
        // _exit, both async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// The process's first stop signal, if one arrived since [`install_signal_handlers`].
pub fn process_signal() -> Option<i32> {
    match PROCESS_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Where a run looks for a stop request.
#[derive(Clone, Debug, Default)]
pub enum StopSource {
    /// Never stops early (library default).
    #[default]
    Never,
    /// The process's SIGTERM / SIGINT (after [`install_signal_handlers`]).
    Process,
    /// A flag set with [`StopSource::request`]: the value is the signal number to report.
    Flag(Arc<AtomicI32>),
}

impl StopSource {
    /// A flag of its own, not set.
    pub fn flag() -> Self {
        StopSource::Flag(Arc::new(AtomicI32::new(0)))
    }

    /// Sets a [`StopSource::Flag`] as if `signal` had arrived (no effect on the others).
    pub fn request(&self, signal: i32) {
        if let StopSource::Flag(f) = self {
            f.store(signal, Ordering::SeqCst);
        }
    }

    /// The signal number of a pending request.
    pub fn requested(&self) -> Option<i32> {
        match self {
            StopSource::Never => None,
            StopSource::Process => process_signal(),
            StopSource::Flag(f) => match f.load(Ordering::SeqCst) {
                0 => None,
                s => Some(s),
            },
        }
    }
}

/// `SIGTERM`, `SIGINT`, or `signal N`.
pub fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        s => format!("signal {s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_reports_the_signal_it_was_given() {
        let s = StopSource::flag();
        assert_eq!(s.requested(), None);
        s.request(libc::SIGTERM);
        assert_eq!(s.requested(), Some(libc::SIGTERM));
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(libc::SIGINT), "SIGINT");
        assert_eq!(StopSource::Never.requested(), None);
    }
}
