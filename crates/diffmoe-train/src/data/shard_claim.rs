//! Claims on the shards of a latent cache, so that several `cache-latents`
//! processes (N GPUs, N machines on a shared file system) can fill one
//! directory together without two of them ever writing the same shard.
//!
//! A claim on shard `shard-00007` is a file `shard-00007.claim-G` holding its
//! owner (host, pid, the process's start time, a per-run token) as JSON.
//! Claims have generations `G = 0, 1, ...`; the highest one present is the
//! claim in force. A claim file is written under a unique temporary name,
//! fsynced and hard-linked to its final name, which fails if that name
//! exists: creation is atomic and exclusive (as `create_new`), and a claim is
//! never seen half written.
//!
//! To claim a shard, a process looks at the highest generation `G`:
//! - none: it creates generation 0;
//! - held by a live process, or by one it cannot check (another host, no
//!   `/proc`): it leaves the shard alone;
//! - left by a process that is gone (same host, the pid no longer runs, or
//!   runs a process started at another time): it takes over by creating
//!   generation `G + 1`.
//!
//! Exactly one process succeeds in creating a given generation, and a live
//! claim is never superseded, so at most one live process owns a shard. The
//! owner writes the shard (an atomic rename), then removes the claims of all
//! generations. A claim whose process is gone on another host blocks its
//! shard until its files are deleted by hand; `--worker I/N` splits shards
//! between machines without claims.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::cache_error::CacheError;

/// The infix between a shard's stem and a claim's generation.
const CLAIM_INFIX: &str = ".claim-";

/// A name no other process, and no other run in this process, uses.
pub(crate) fn unique_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{nanos}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Who holds a claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimOwner {
    /// The host name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`).
    pub host: String,
    /// The process id on that host.
    pub pid: u32,
    /// The process's start time in clock ticks since boot (`/proc/PID/stat`
    /// field 22), which tells a reused pid from the original process.
    pub process_start: Option<u64>,
    /// When the claim was made, in seconds since the Unix epoch.
    pub claimed_unix: u64,
    /// Distinguishes runs inside one process.
    pub token: String,
}

impl std::fmt::Display for ClaimOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on host {} (claimed at Unix time {})", self.pid, self.host, self.claimed_unix)
    }
}

/// What is known of the process holding a claim that is respected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// It runs on this host.
    Running,
    /// It is on another host (or this host has no `/proc`), so whether it
    /// still runs cannot be checked; its claim stands until deleted by hand.
    Unverifiable,
}

/// Whether a claim's owner still runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Liveness {
    Alive,
    Gone,
    /// Another host, or no `/proc` to look in: treated as alive.
    Unknown,
}

/// A process as `/proc/PID/stat` shows it.
struct ProcStat {
    /// Field 3: `Z` (zombie) or `X` (dead) is a process that has exited.
    state: char,
    /// Field 22, `starttime`, in clock ticks since boot.
    start: Option<u64>,
}

impl ProcStat {
    /// Reads `/proc/PID/stat`; `comm` (field 2) may hold spaces and
    /// parentheses, so fields are counted after the last `)`.
    fn read(pid: &str) -> std::io::Result<ProcStat> {
        let stat = std::fs::read_to_string(Path::new("/proc").join(pid).join("stat"))?;
        let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        // Field 3 is the first after `comm`, so field 22 is the 20th.
        Ok(ProcStat {
            state: fields.first().and_then(|s| s.chars().next()).unwrap_or('?'),
            start: fields.get(19).and_then(|s| s.parse().ok()),
        })
    }

    fn exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown-host".to_string())
}

impl ClaimOwner {
    /// This process, with a fresh token: one per cache run.
    pub(crate) fn this_process() -> Self {
        ClaimOwner {
            host: host_name(),
            pid: std::process::id(),
            process_start: ProcStat::read("self").ok().and_then(|s| s.start),
            claimed_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            token: unique_token(),
        }
    }

    /// Whether the owner of a claim still runs, seen from `me`.
    fn liveness(&self, me: &ClaimOwner) -> Liveness {
        if self.host != me.host {
            return Liveness::Unknown;
        }
        let started_then = |now: Option<u64>| match (self.process_start, now) {
            (Some(then), Some(now)) if then != now => Liveness::Gone,
            _ => Liveness::Alive,
        };
        if self.pid == me.pid {
            return started_then(me.process_start);
        }
        if !Path::new("/proc/self/stat").exists() {
            return Liveness::Unknown;
        }
        match ProcStat::read(&self.pid.to_string()) {
            // Killed but not yet reaped by its parent.
            Ok(stat) if stat.exited() => Liveness::Gone,
            Ok(stat) => started_then(stat.start),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Liveness::Gone,
            Err(_) => Liveness::Unknown,
        }
    }
}

/// The path of generation `generation` of the claim on the shard at `shard`
/// (`dir/shard-00007.safetensors` -> `dir/shard-00007.claim-3`).
fn claim_path(shard: &Path, generation: u32) -> PathBuf {
    let stem = shard.file_stem().unwrap_or_default().to_string_lossy();
    shard.with_file_name(format!("{stem}{CLAIM_INFIX}{generation}"))
}

/// The claim files of `shard` present now, generation 0 upwards until the first gap.
fn present_generations(shard: &Path) -> u32 {
    (0..).find(|&g| !claim_path(shard, g).exists()).expect("a free generation")
}

/// The outcome of trying to claim a shard.
#[derive(Debug)]
pub(crate) enum ClaimAttempt {
    /// The shard is ours to write; `took_over` is the owner of the stale claim replaced.
    Claimed { claim: Claim, took_over: Option<ClaimOwner> },
    /// The shard is complete.
    Done,
    /// A live process, or one that cannot be checked, holds it.
    Held { owner: ClaimOwner, path: PathBuf, holder: Holder },
}

/// A claim this process holds. Dropping it without [`Claim::finish`] (an
/// error, a panic) removes it, so another process may take the shard at once.
#[derive(Debug)]
pub(crate) struct Claim {
    shard: PathBuf,
    generation: u32,
    finished: bool,
}

impl Claim {
    /// Removes the claims of every generation, once the shard has been written.
    pub fn finish(mut self) {
        for g in 0..=self.generation {
            let _ = std::fs::remove_file(claim_path(&self.shard, g));
        }
        self.finished = true;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(claim_path(&self.shard, self.generation));
        }
    }
}

/// Publishes `owner` as `path`, atomically and exclusively; `Ok(false)` if
/// the name exists.
fn publish(path: &Path, owner: &ClaimOwner) -> Result<bool, CacheError> {
    publish_exclusively(path, &serde_json::to_vec(owner).expect("a claim serialises"), &owner.token)
}

/// Creates `path` holding `bytes`, complete or not at all, unless the name
/// exists (`Ok(false)`): the bytes go to a temporary file named after
/// `token`, which is synced and hard-linked to `path` (a link, unlike a
/// rename, never replaces an existing name), then removed.
pub(super) fn publish_exclusively(path: &Path, bytes: &[u8], token: &str) -> Result<bool, CacheError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{token}.tmp"));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    written.map_err(|e| CacheError::io(&tmp, e))?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(CacheError::io(path, source)),
    }
}

/// Reads the owner of a claim file; `None` if it vanished meanwhile (its
/// owner finished or gave up). A file that is not a claim counts as left by
/// a process that is gone.
fn read_owner(path: &Path) -> Result<Option<Result<ClaimOwner, serde_json::Error>>, CacheError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CacheError::io(path, source)),
    }
}

/// Tries to claim the shard whose final file is `shard` for `me`.
pub(crate) fn try_claim(shard: &Path, me: &ClaimOwner) -> Result<ClaimAttempt, CacheError> {
    loop {
        if shard.exists() {
            return Ok(ClaimAttempt::Done);
        }
        let generation = present_generations(shard);
        let took_over = match generation.checked_sub(1) {
            None => None,
            Some(top) => {
                let path = claim_path(shard, top);
                match read_owner(&path)? {
                    // Released meanwhile: look again.
                    None => continue,
                    Some(Ok(owner)) => match owner.liveness(me) {
                        Liveness::Alive => {
                            return Ok(ClaimAttempt::Held { owner, path, holder: Holder::Running });
                        }
                        Liveness::Unknown => {
                            return Ok(ClaimAttempt::Held { owner, path, holder: Holder::Unverifiable });
                        }
                        Liveness::Gone => Some(owner),
                    },
                    Some(Err(_)) => None,
                }
            }
        };
        if publish(&claim_path(shard, generation), me)? {
            let claim = Claim { shard: shard.to_path_buf(), generation, finished: false };
            // Written and released between our first look and our claim.
            if shard.exists() {
                claim.finish();
                return Ok(ClaimAttempt::Done);
            }
            return Ok(ClaimAttempt::Claimed { claim, took_over });
        }
        // Another process created this generation first: look again.
    }
}

/// Removes every claim file (and claim temporary) of the complete shards
/// among `shards`: leftovers of owners killed after writing.
pub(crate) fn sweep_claims(dir: &Path, complete: &dyn Fn(&str) -> bool) -> Result<(), CacheError> {
    for entry in std::fs::read_dir(dir).map_err(|e| CacheError::io(dir, e))? {
        let path = entry.map_err(|e| CacheError::io(dir, e))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if let Some((stem, _)) = name.trim_start_matches('.').split_once(CLAIM_INFIX) {
            if complete(stem) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;

    /// The pid of a process that has exited.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().expect("spawn `true`");
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    fn claim_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn claims_are_exclusive_and_released() {
        let dir = test_dir("claims");
        let shard = dir.join("shard-00001.safetensors");
        let (a, b) = (ClaimOwner::this_process(), ClaimOwner::this_process());
        let ClaimAttempt::Claimed { claim, took_over: None } = try_claim(&shard, &a).unwrap() else { panic!() };
        assert_eq!(claim_files(&dir), ["shard-00001.claim-0"]);
        // Another run of this (live) process leaves it alone.
        let ClaimAttempt::Held { owner, holder: Holder::Running, .. } = try_claim(&shard, &b).unwrap() else {
            panic!()
        };
        assert_eq!(owner, a);
        // Given up without writing: free again.
        drop(claim);
        assert!(claim_files(&dir).is_empty());
        let ClaimAttempt::Claimed { claim, .. } = try_claim(&shard, &b).unwrap() else { panic!() };
        std::fs::write(&shard, b"written").unwrap();
        claim.finish();
        assert_eq!(claim_files(&dir), ["shard-00001.safetensors"]);
        assert!(matches!(try_claim(&shard, &a).unwrap(), ClaimAttempt::Done));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn claims_of_gone_processes_are_taken_over() {
        if !Path::new("/proc/self/stat").exists() {
            return; // Without /proc no process can be checked, so no claim is ever stale.
        }
        let dir = test_dir("claims-stale");
        let me = ClaimOwner::this_process();
        let shard = dir.join("shard-00002.safetensors");
        // A killed process on this host.
        let dead = ClaimOwner { pid: dead_pid(), process_start: None, ..ClaimOwner::this_process() };
        assert!(publish(&claim_path(&shard, 0), &dead).unwrap());
        // Then a reused pid: ours, but started at another time.
        let reused = ClaimOwner { process_start: Some(1), ..ClaimOwner::this_process() };
        let ClaimAttempt::Claimed { claim, took_over } = try_claim(&shard, &reused).unwrap() else { panic!() };
        assert_eq!(took_over, Some(dead));
        std::mem::forget(claim);
        assert_eq!(claim_files(&dir), ["shard-00002.claim-0", "shard-00002.claim-1"]);
        let ClaimAttempt::Claimed { claim, took_over } = try_claim(&shard, &me).unwrap() else { panic!() };
        assert_eq!(took_over.map(|o| o.process_start), Some(Some(1)));
        std::fs::write(&shard, b"written").unwrap();
        claim.finish();
        assert_eq!(claim_files(&dir), ["shard-00002.safetensors"]);

        // Another host cannot be checked: its claim holds.
        let shard = dir.join("shard-00003.safetensors");
        let remote = ClaimOwner { host: format!("{}-elsewhere", me.host), pid: dead_pid(), ..me.clone() };
        assert!(publish(&claim_path(&shard, 0), &remote).unwrap());
        assert!(
            matches!(try_claim(&shard, &me).unwrap(), ClaimAttempt::Held { owner, holder: Holder::Unverifiable, .. } if owner == remote)
        );
        // An unreadable claim file is taken over.
        let shard = dir.join("shard-00004.safetensors");
        std::fs::write(claim_path(&shard, 0), b"garbage").unwrap();
        assert!(matches!(try_claim(&shard, &me).unwrap(), ClaimAttempt::Claimed { took_over: None, .. }));

        // Leftover claims of complete shards are swept.
        std::fs::write(dir.join("shard-00003.safetensors"), b"written").unwrap();
        sweep_claims(&dir, &|stem| dir.join(format!("{stem}.safetensors")).exists()).unwrap();
        assert!(!claim_path(&dir.join("shard-00003.safetensors"), 0).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn proc_stat_reads_state_and_start_time() {
        if !Path::new("/proc/self/stat").exists() {
            return;
        }
        let ours = ProcStat::read("self").unwrap();
        assert!(ours.start.is_some() && !ours.exited());
        assert_eq!(ProcStat::read(&std::process::id().to_string()).unwrap().start, ours.start);
        // An exited child not yet waited for is a zombie, and its claims are stale.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let zombie = ClaimOwner { pid: child.id(), process_start: None, ..ClaimOwner::this_process() };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !ProcStat::read(&child.id().to_string()).unwrap().exited() {
            assert!(std::time::Instant::now() < deadline, "`true` did not exit");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(zombie.liveness(&ClaimOwner::this_process()), Liveness::Gone);
        child.wait().unwrap();
    }
}
