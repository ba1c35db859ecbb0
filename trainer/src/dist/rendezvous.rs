//! The rendezvous of a multi-process run: rank 0 listens at `MASTER_ADDR:MASTER_PORT`, every
//! other rank connects and says who it is and what it runs ([`Hello`]: rank, world size, recipe
//! hash, code version); rank 0 checks them against its own and answers every rank with the
//! token the collective needs (NCCL's unique id), or with the error that stops them all. A rank
//! missing after the timeout stops every rank with an error naming it; nothing waits forever.
//!
//! One JSON object per line over TCP; the connections close after the answer.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{DistError, RankInfo, Result};

/// What a rank tells rank 0 (and rank 0 checks against its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The rank.
    pub rank: usize,
    /// Its world size.
    pub world_size: usize,
    /// SHA-256 of its resolved recipe.
    pub recipe_hash: String,
    /// Its program's version (crate version and build).
    pub code_version: String,
}

/// Rendezvous settings.
#[derive(Clone, Debug)]
pub struct RendezvousOptions {
    /// How long rank 0 waits for the others, and the others for rank 0 (default 300 s).
    pub timeout: Duration,
}

impl Default for RendezvousOptions {
    fn default() -> Self {
        RendezvousOptions {
            timeout: Duration::from_secs(300),
        }
    }
}

/// The outcome, the same on every rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendezvous {
    /// Rank 0's token (NCCL's unique id; empty when the collective needs none).
    pub token: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    token: Vec<u8>,
    #[serde(default)]
    error: String,
}

fn net(addr: &str, message: impl std::fmt::Display) -> DistError {
    DistError::Net {
        addr: addr.to_string(),
        message: message.to_string(),
    }
}

/// Meets the other ranks of `info`'s world. Rank 0 calls `token` once every rank has arrived
/// and checked out, and sends its bytes to all.
pub fn rendezvous(
    info: &RankInfo,
    hello: &Hello,
    token: impl FnOnce() -> Result<Vec<u8>>,
    opts: &RendezvousOptions,
) -> Result<Rendezvous> {
    if info.world_size == 1 {
        return Ok(Rendezvous { token: token()? });
    }
    let addr = info.master.clone().ok_or_else(|| DistError::Env {
        var: "MASTER_ADDR".into(),
        message: "not set".into(),
    })?;
    if info.rank == 0 {
        serve(&addr, info, hello, token, opts)
    } else {
        join(&addr, hello, opts)
    }
}

/// The other side of a [`Hello`], checked against rank 0's.
fn check(ours: &Hello, theirs: &Hello, world: usize) -> std::result::Result<(), DistError> {
    let mismatch = |field: &str, o: String, t: String| DistError::Mismatch {
        rank: theirs.rank,
        field: field.into(),
        ours: o,
        theirs: t,
    };
    if theirs.world_size != world {
        return Err(mismatch(
            "world size",
            world.to_string(),
            theirs.world_size.to_string(),
        ));
    }
    if theirs.recipe_hash != ours.recipe_hash {
        return Err(mismatch(
            "recipe (hash of the resolved recipe)",
            ours.recipe_hash.clone(),
            theirs.recipe_hash.clone(),
        ));
    }
    if theirs.code_version != ours.code_version {
        return Err(mismatch(
            "code version",
            ours.code_version.clone(),
            theirs.code_version.clone(),
        ));
    }
    Ok(())
}

/// Answers a rank with the error that stops the run.
fn refuse(stream: &mut TcpStream, e: &DistError) {
    send(
        stream,
        &Answer {
            ok: false,
            token: vec![],
            error: e.to_string(),
        },
    );
}

fn send(stream: &mut TcpStream, answer: &Answer) {
    if let Ok(mut line) = serde_json::to_vec(answer) {
        line.push(b'\n');
        let _ = stream.write_all(&line);
        let _ = stream.flush();
    }
}

fn serve(
    addr: &str,
    info: &RankInfo,
    hello: &Hello,
    token: impl FnOnce() -> Result<Vec<u8>>,
    opts: &RendezvousOptions,
) -> Result<Rendezvous> {
    // Listen on every interface at the port: other machines connect to MASTER_ADDR.
    let port = addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .ok_or_else(|| net(addr, "no port"))?;
    let listener = TcpListener::bind(("0.0.0.0", port))
        .map_err(|e| net(addr, format!("rank 0 cannot listen on port {port}: {e}")))?;
    listener.set_nonblocking(true).map_err(|e| net(addr, e))?;
    let start = Instant::now();
    let mut joined: Vec<Option<TcpStream>> = (0..info.world_size).map(|_| None).collect();
    // Answers every rank that joined, and for a moment every rank still connecting, with the
    // error (so no rank is left with a reset connection instead of the reason).
    let fail_all =
        |joined: &mut Vec<Option<TcpStream>>, e: DistError, linger: Option<usize>| -> DistError {
            let answer = Answer {
                ok: false,
                token: vec![],
                error: e.to_string(),
            };
            for s in joined.iter_mut().flatten() {
                send(s, &answer);
            }
            let since = Instant::now();
            // Ranks answered: those that joined, and the one answered directly (if any).
            let mut answered = joined.iter().filter(|s| s.is_some()).count() + linger.unwrap_or(0);
            while linger.is_some()
                && answered + 1 < info.world_size
                && since.elapsed() < Duration::from_secs(3)
            {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut line = String::new();
                        let _ = BufReader::new(&s).read_line(&mut line);
                        send(&mut s, &answer);
                        answered += 1;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            e
        };
    while joined.iter().skip(1).any(Option::is_none) {
        if start.elapsed() >= opts.timeout {
            let missing = (1..info.world_size)
                .filter(|&r| joined[r].is_none())
                .collect();
            let e = DistError::Timeout {
                what: format!("rendezvous at {addr}"),
                missing,
                timeout_s: opts.timeout.as_secs_f64(),
            };
            return Err(fail_all(&mut joined, e, None));
        }
        let (mut stream, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(fail_all(&mut joined, net(addr, e), Some(0))),
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut line = String::new();
        let read = BufReader::new(&stream).read_line(&mut line);
        let theirs: Hello = match read.map_err(|e| e.to_string()).and_then(|_| {
            serde_json::from_str(line.trim()).map_err(|e| format!("{e}: {:?}", line.trim()))
        }) {
            Ok(h) => h,
            // Not one of ours (a port scan, a stale client): ignore it.
            Err(_) => continue,
        };
        if theirs.rank == 0 || theirs.rank >= info.world_size {
            let e = DistError::Mismatch {
                rank: theirs.rank,
                field: "rank".into(),
                ours: format!("1..{}", info.world_size),
                theirs: theirs.rank.to_string(),
            };
            refuse(&mut stream, &e);
            return Err(fail_all(&mut joined, e, Some(1)));
        }
        if joined[theirs.rank].is_some() {
            let e = net(
                addr,
                format!(
                    "rank {} arrived twice (two processes with the same RANK?)",
                    theirs.rank
                ),
            );
            refuse(&mut stream, &e);
            return Err(fail_all(&mut joined, e, Some(1)));
        }
        if let Err(e) = check(hello, &theirs, info.world_size) {
            refuse(&mut stream, &e);
            return Err(fail_all(&mut joined, e, Some(1)));
        }
        joined[theirs.rank] = Some(stream);
    }
    let token = match token() {
        Ok(t) => t,
        Err(e) => return Err(fail_all(&mut joined, e, None)),
    };
    for s in joined.iter_mut().flatten() {
        send(
            s,
            &Answer {
                ok: true,
                token: token.clone(),
                error: String::new(),
            },
        );
    }
    Ok(Rendezvous { token })
}

fn join(addr: &str, hello: &Hello, opts: &RendezvousOptions) -> Result<Rendezvous> {
    let start = Instant::now();
    // Rank 0 may start later: retry until the timeout.
    let mut stream = loop {
        let attempt = addr
            .to_socket_addrs()
            .map_err(|e| net(addr, format!("cannot resolve: {e}")))?
            .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok());
        if let Some(s) = attempt {
            break s;
        }
        if start.elapsed() >= opts.timeout {
            return Err(DistError::Timeout {
                what: format!("rendezvous at {addr} (rank {})", hello.rank),
                missing: vec![0],
                timeout_s: opts.timeout.as_secs_f64(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut line = serde_json::to_vec(hello).map_err(|e| net(addr, e))?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| net(addr, format!("sending to rank 0: {e}")))?;
    // Rank 0 answers once every rank has arrived, or after its own timeout.
    let _ = stream.set_read_timeout(Some(opts.timeout + Duration::from_secs(30)));
    let mut answer = String::new();
    let closed = || {
        net(
            addr,
            "rank 0 closed the connection without an answer (it failed: see its error)",
        )
    };
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionReset => closed(),
            _ => net(addr, format!("waiting for rank 0's answer: {e}")),
        })?;
    if answer.trim().is_empty() {
        return Err(closed());
    }
    let a: Answer = serde_json::from_str(answer.trim())
        .map_err(|e| net(addr, format!("rank 0's answer: {e}")))?;
    if !a.ok {
        return Err(DistError::PeerFailed {
            rank: 0,
            reason: a.error,
        });
    }
    Ok(Rendezvous { token: a.token })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn info(rank: usize, world: usize, port: u16) -> RankInfo {
        RankInfo {
            rank,
            world_size: world,
            local_rank: rank,
            local_world_size: world,
            master: Some(format!("127.0.0.1:{port}")),
        }
    }

    fn hello(rank: usize, world: usize, recipe: &str) -> Hello {
        Hello {
            rank,
            world_size: world,
            recipe_hash: recipe.into(),
            code_version: "v1".into(),
        }
    }

    fn meet(world: usize, recipes: &[&str], timeout_ms: u64) -> Vec<Result<Rendezvous>> {
        let port = free_port();
        let opts = RendezvousOptions {
            timeout: Duration::from_millis(timeout_ms),
        };
        let handles: Vec<_> = recipes
            .iter()
            .enumerate()
            .map(|(rank, recipe)| {
                let (i, h, o) = (
                    info(rank, world, port),
                    hello(rank, world, recipe),
                    opts.clone(),
                );
                std::thread::spawn(move || rendezvous(&i, &h, || Ok(vec![1, 2, 3]), &o))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn every_rank_gets_the_token() {
        for r in meet(4, &["a", "a", "a", "a"], 10_000) {
            assert_eq!(r.unwrap().token, vec![1, 2, 3]);
        }
    }

    #[test]
    fn a_recipe_mismatch_stops_every_rank_naming_it() {
        let out = meet(3, &["a", "a", "b"], 10_000);
        for r in &out {
            let e = r.as_ref().unwrap_err().to_string();
            assert!(e.contains("rank 2: recipe"), "{e}");
        }
    }

    #[test]
    fn a_missing_rank_times_out_by_name() {
        let t0 = Instant::now();
        // World of 3, rank 2 never starts.
        let out = meet(3, &["a", "a"], 500);
        assert!(t0.elapsed() < Duration::from_secs(5));
        for r in &out {
            let e = r.as_ref().unwrap_err().to_string();
            assert!(e.contains("rank(s) [2] did not arrive within 0.5 s"), "{e}");
        }
    }
}
