//! The local launcher behind `train --nproc-per-node N` on GPUs: N worker processes of the same
//! program on this machine, one per GPU, with torchrun's variables (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR=127.0.0.1`, `MASTER_PORT` a free port), their
//! output forwarded line by line with a `[rank R]` prefix. When a worker fails, the others are
//! stopped (SIGTERM, then SIGKILL after a grace period) and the launcher returns the failing
//! rank's exit code and last error line, as `torchrun --standalone` does.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{DistError, Result};

/// What to launch.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    /// Workers (GPUs on this machine).
    pub nproc: usize,
    /// The program (normally `std::env::current_exe()`).
    pub program: PathBuf,
    /// Its arguments (the launcher's own flag removed).
    pub args: Vec<OsString>,
    /// The rendezvous port (`None`: a free one).
    pub master_port: Option<u16>,
    /// How long a stopped worker gets between SIGTERM and SIGKILL.
    pub grace: Duration,
}

/// How the workers ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchOutcome {
    /// 0 when every worker succeeded, else the first failing worker's code (1 if killed).
    pub exit_code: i32,
    /// The first failing rank and its last line on stderr.
    pub failed: Option<(usize, String)>,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| DistError::Net {
        addr: "127.0.0.1:0".into(),
        message: format!("no free port for the rendezvous: {e}"),
    })?;
    Ok(l.local_addr()
        .map_err(|e| DistError::Net {
            addr: "127.0.0.1:0".into(),
            message: e.to_string(),
        })?
        .port())
}

/// Forwards `from` line by line to stdout or stderr with `prefix`; keeps the last line.
fn forward(
    from: impl std::io::Read + Send + 'static,
    prefix: String,
    to_stderr: bool,
    last: Arc<Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if to_stderr {
                let _ = writeln!(std::io::stderr().lock(), "{prefix}{line}");
                if !line.trim().is_empty() {
                    *last.lock().unwrap_or_else(|p| p.into_inner()) = line;
                }
            } else {
                let _ = writeln!(std::io::stdout().lock(), "{prefix}{line}");
            }
        }
    })
}

use crate::train::stop::EXIT_STOPPED;

fn terminate(child: &mut Child) {
    // SIGTERM first: a worker may finish its update and write a checkpoint.
    // SAFETY: kill(2) on the pid of a child this process spawned and has not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
}

/// Runs the workers to completion (see the module docs).
pub fn launch_local(opts: &LaunchOptions) -> Result<LaunchOutcome> {
    if opts.nproc == 0 {
        return Err(DistError::Unsupported(
            "--nproc-per-node must be at least 1".into(),
        ));
    }
    let port = match opts.master_port {
        Some(p) => p,
        None => free_port()?,
    };
    let mut children: Vec<Child> = Vec::with_capacity(opts.nproc);
    let mut pumps = Vec::new();
    let mut last_err: Vec<Arc<Mutex<String>>> = Vec::new();
    for rank in 0..opts.nproc {
        let mut cmd = Command::new(&opts.program);
        cmd.args(&opts.args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", opts.nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", opts.nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                for c in &mut children {
                    terminate(c);
                }
                return Err(DistError::Unsupported(format!(
                    "starting worker {rank} ({}): {e}",
                    opts.program.display()
                )));
            }
        };
        let last = Arc::new(Mutex::new(String::new()));
        let prefix = format!("[rank {rank}] ");
        if let Some(out) = child.stdout.take() {
            pumps.push(forward(out, prefix.clone(), false, last.clone()));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(forward(err, prefix, true, last.clone()));
        }
        last_err.push(last);
        children.push(child);
    }
    let mut done: Vec<Option<i32>> = vec![None; opts.nproc];
    let mut failed: Option<(usize, i32)> = None;
    let mut stop_at: Option<Instant> = None;
    let mut forwarded = false;
    loop {
        for (rank, child) in children.iter_mut().enumerate() {
            if done[rank].is_some() {
                continue;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let code = status.code().unwrap_or(1);
                done[rank] = Some(code);
                // A worker that stopped on a signal after its checkpoint has not failed.
                if code != 0 && code != EXIT_STOPPED && failed.is_none() {
                    failed = Some((rank, code));
                }
            }
        }
        if done.iter().all(Option::is_some) {
            break;
        }
        // A stop signal to the launcher goes on to the workers (once): they stop together after
        // the same update, write a checkpoint and exit with EXIT_STOPPED.
        if let (Some(signal), false) = (crate::train::stop::process_signal(), forwarded) {
            forwarded = true;
            for (rank, child) in children.iter_mut().enumerate() {
                if done[rank].is_none() {
                    // SAFETY: kill(2) on the pid of a child this process spawned and has not
                    // reaped.
                    unsafe {
                        libc::kill(child.id() as libc::pid_t, signal);
                    }
                }
            }
        }
        if failed.is_some() {
            match stop_at {
                None => {
                    for (rank, child) in children.iter_mut().enumerate() {
                        if done[rank].is_none() {
                            terminate(child);
                        }
                    }
                    stop_at = Some(Instant::now() + opts.grace);
                }
                Some(t) if Instant::now() >= t => {
                    for (rank, child) in children.iter_mut().enumerate() {
                        if done[rank].is_none() {
                            let _ = child.kill();
                        }
                    }
                }
                Some(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in pumps {
        let _ = p.join();
    }
    let stopped = done.contains(&Some(EXIT_STOPPED));
    Ok(match failed {
        None => LaunchOutcome {
            exit_code: if stopped { EXIT_STOPPED } else { 0 },
            failed: None,
        },
        Some((rank, code)) => LaunchOutcome {
            exit_code: code,
            failed: Some((
                rank,
                last_err[rank]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            )),
        },
    })
}
