//! Polling directory lister: one walk of `WATCH_DIR` → a list of observations.
//!
//! Polling, not inotify, because the watched directory is often an NFS or SMB
//! mount where change notifications never arrive. Each pass stats every
//! matching regular file (size, mtime, device, inode) and says what it could
//! not see, so that an error is never mistaken for an absence: a file is
//! absent only when a listing of its directory succeeded without it (or its
//! stat said `ENOENT`). Any other error on a file or a directory (`EIO`,
//! `ESTALE`, `ENOTCONN`, `EACCES`, …) marks that path unreadable, and a
//! watch directory that cannot be listed, or that is suddenly another file
//! system (remounted, or the mount dropped away), makes the whole scan blind.
//! Problems are logged when they start, with the path and errno, and when
//! they end, at most once a minute per path; not once per poll.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::rules::Rules;
use crate::watchfs::{Entry, FileSystem, Kind, RealFs, errno_name, is_absence};

mod report;

use report::{ProblemLog, Problems};

/// What makes a file the same file across polls, renames and hosts: its
/// inode on its file system. A new inode at the same path is a different file.
///
/// Replicas on several hosts that mount the same NFS export must agree on it,
/// but the device number of one export differs from host to host. So files on
/// `WATCH_DIR`'s own file system (the normal case) get [`WATCH_DIR_DEVICE`];
/// only a file on another file system mounted below `WATCH_DIR` keeps its real
/// device number, which is then stable on one host only. The inode number of
/// an NFS file is the server's, the same on every client (SMB: with the
/// default `serverino` mount option). See docs/scaling.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileIdentity {
    pub device: u64,
    pub inode: u64,
}

/// The device part of the identity of every file on `WATCH_DIR`'s own file
/// system (no real file system has device number 0).
pub const WATCH_DIR_DEVICE: u64 = 0;

impl FileIdentity {
    /// The form used in Redis keys and logs: `device:inode`.
    pub fn key(&self) -> String {
        format!("{}:{}", self.device, self.inode)
    }

    /// Parses [`FileIdentity::key`] back.
    pub fn parse_key(key: &str) -> Option<Self> {
        let (device, inode) = key.split_once(':')?;
        Some(Self {
            device: device.parse().ok()?,
            inode: inode.parse().ok()?,
        })
    }
}

/// One matching regular file as seen by one poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Relative to the watch directory, with `/` separators. Shared, so the
    /// cached observation of a cold file is cloned for free on every poll.
    pub rel_path: Arc<str>,
    pub abs_path: Arc<Path>,
    pub identity: FileIdentity,
    pub size: u64,
    /// Modification time in nanoseconds since the epoch, as the file system
    /// reports it. Only ever compared for equality: NFS clocks are not trusted.
    pub mtime_ns: i128,
}

impl Observation {
    /// Same file, same size, same mtime.
    fn same_file_state(&self, other: &Observation) -> bool {
        self.identity == other.identity
            && self.size == other.size
            && self.mtime_ns == other.mtime_ns
    }
}

/// The result of one poll.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub files: Vec<Observation>,
    /// Why nothing at all may be concluded from this scan about files that
    /// are not in it: the watch directory could not be read, or it is now
    /// another file system than at the last scan. `None`: the scan saw.
    pub blind: Option<String>,
    /// Relative paths, of files or directories, that could not be read this
    /// time: they and everything below them are in an unknown state, not
    /// missing.
    pub unreadable: Vec<String>,
    /// Names in the watch directory itself (hidden ones included).
    pub root_entries: usize,
    /// Every directory listed in full (`""` is the watch directory), with
    /// the device it is on, in the form of [`FileIdentity::device`].
    pub listed: HashMap<String, u64>,
}

impl Scan {
    /// A scan that saw `files` and nothing else.
    #[cfg(test)]
    pub fn clear(files: Vec<Observation>) -> Self {
        Self {
            root_entries: files.len(),
            files,
            blind: None,
            unreadable: Vec::new(),
            listed: HashMap::from([(String::new(), WATCH_DIR_DEVICE)]),
        }
    }

    /// Whether this scan proves that a file at `rel_path`, which was on
    /// `device`, is gone: nothing on the way was unreadable, and the nearest
    /// directory above it that was listed is on the same file system (a
    /// network mount below `WATCH_DIR` that dropped away leaves an empty
    /// local directory, which proves nothing).
    pub fn proves_absent(&self, rel_path: &str, device: u64) -> bool {
        if !self.covers(rel_path) {
            return false;
        }
        let mut dir = rel_path;
        loop {
            dir = dir.rsplit_once('/').map_or("", |(parent, _)| parent);
            if let Some(listed) = self.listed.get(dir) {
                return *listed == device;
            }
            if dir.is_empty() {
                return false;
            }
        }
    }

    /// Whether an absent file at `rel_path` can be trusted to be really absent:
    /// neither it nor a directory above it was unreadable.
    pub fn covers(&self, rel_path: &str) -> bool {
        self.blind.is_none()
            && !self.unreadable.iter().any(|path| {
                path.is_empty()
                    || rel_path
                        .strip_prefix(path.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
    }

    /// Paths that could not be read, the watch directory counted as one.
    pub fn unreadable_count(&self) -> usize {
        self.unreadable.len() + usize::from(self.blind.is_some())
    }
}

/// Something that can list the watched files. The real one walks the disk; a
/// fake one lets the coordinator be tested without files.
pub trait DirectoryLister: Send {
    fn scan(&mut self) -> Scan;
}

/// A cold file is stat'ed at most once every this many polls.
pub const MAX_COLD_SKIP_POLLS: u64 = 8;

/// The last stat of a file, and how long it has not changed.
struct Stat {
    observation: Observation,
    unchanged_since: Instant,
    /// Polls skipped between stats now (0: stat every poll), doubling up to
    /// `MAX_COLD_SKIP_POLLS` while the file stays unchanged.
    skip: u64,
    next_stat_poll: u64,
    /// The last poll whose walk reached the file.
    seen_poll: u64,
}

impl Stat {
    fn fresh(observation: Observation, now: Instant, poll: u64) -> Self {
        Self {
            observation,
            unchanged_since: now,
            skip: 0,
            next_stat_poll: poll + 1,
            seen_poll: poll,
        }
    }
}

/// One walk in progress: what it found so far.
struct Walk {
    scan: Scan,
    problems: Problems,
    now: Instant,
    root_device: u64,
}

/// A device number as [`FileIdentity::device`] has it: [`WATCH_DIR_DEVICE`]
/// for the watch directory's own file system.
fn device_form(device: u64, root_device: u64) -> u64 {
    if device == root_device {
        WATCH_DIR_DEVICE
    } else {
        device
    }
}

impl Walk {
    fn device_form(&self, device: u64) -> u64 {
        device_form(device, self.root_device)
    }

    fn unreadable(&mut self, rel_path: &str, what: &str, err: &io::Error) {
        self.scan.unreadable.push(rel_path.to_string());
        self.problems.unreadable.insert(
            rel_path.to_string(),
            (
                errno_name(err),
                format!(
                    "cannot {what} {rel_path:?} ({}: {err}); keeping its streams as they are until it is readable again",
                    errno_name(err)
                ),
            ),
        );
    }
}

/// Walks a real directory tree (or, in tests, a fake one).
///
/// Stat calls dominate the cost of a poll (the kernel resolves every path).
/// So, like Vector's file source, files unchanged for longer than
/// `cold_after` are stat'ed less often: every 2, 4, … up to
/// [`MAX_COLD_SKIP_POLLS`] polls, with the last stat reported in between. The
/// directory walk itself still sees every file on every poll, so a deleted or
/// renamed file is noticed at once; a change *inside* a cold file (it grows
/// again, or is replaced at the same path) is noticed within
/// `MAX_COLD_SKIP_POLLS` polls.
pub struct FsLister<F: FileSystem = RealFs> {
    fs: F,
    root: PathBuf,
    rules: Rules,
    /// What was logged about which path, for rate limiting.
    log: ProblemLog,
    cold_after: Duration,
    stats: HashMap<String, Stat>,
    poll: u64,
    /// The device number of the watch directory at the last scan that could
    /// read it.
    root_device: Option<u64>,
    /// The device of every subdirectory at the last scan that listed it, to
    /// say when a mount below the watch directory comes or goes.
    dir_devices: HashMap<String, u64>,
}

impl FsLister {
    pub fn new(root: PathBuf, rules: Rules, cold_after: Duration) -> Self {
        Self::with_fs(RealFs, root, rules, cold_after)
    }
}

impl<F: FileSystem> FsLister<F> {
    pub fn with_fs(fs: F, root: PathBuf, rules: Rules, cold_after: Duration) -> Self {
        Self {
            fs,
            root,
            rules,
            log: ProblemLog::default(),
            cold_after,
            stats: HashMap::new(),
            poll: 0,
            root_device: None,
            dir_devices: HashMap::new(),
        }
    }

    /// The observation for `rel_path`: the cached one while the file is cold
    /// and not due, else a fresh stat (via `stat`). The cache is updated in
    /// place; entries not seen in this poll are pruned after the walk.
    fn observe(
        &mut self,
        rel_path: &str,
        now: Instant,
        stat: impl FnOnce(&F) -> io::Result<Observation>,
    ) -> io::Result<Observation> {
        let poll = self.poll;
        if let Some(cached) = self.stats.get_mut(rel_path)
            && poll < cached.next_stat_poll
        {
            cached.seen_poll = poll;
            return Ok(cached.observation.clone());
        }
        let observation = stat(&self.fs)?;
        match self.stats.get_mut(rel_path) {
            Some(cached) if cached.observation.same_file_state(&observation) => {
                let quiet = now.saturating_duration_since(cached.unchanged_since);
                cached.skip = if quiet >= self.cold_after {
                    (cached.skip * 2).clamp(1, MAX_COLD_SKIP_POLLS)
                } else {
                    0
                };
                cached.next_stat_poll = poll + 1 + cached.skip;
                cached.seen_poll = poll;
                cached.observation = observation.clone();
            }
            Some(cached) => {
                *cached = Stat::fresh(observation.clone(), now, poll);
            }
            None => {
                self.stats.insert(
                    rel_path.to_string(),
                    Stat::fresh(observation.clone(), now, poll),
                );
            }
        }
        Ok(observation)
    }

    /// Warns when a subdirectory is on another file system than at the last
    /// scan: a mount below the watch directory came or went.
    fn note_device(&mut self, rel_dir: &str, device: u64) {
        match self.dir_devices.insert(rel_dir.to_string(), device) {
            Some(before) if before != device => log::warn!(
                "directory {rel_dir:?} is another file system than a moment ago (device {before} is now {device}): a mount below the watch directory came or went; files missing under it prove nothing until it is back"
            ),
            _ => {}
        }
    }

    /// Walks one directory's `entries` (already listed), depth first.
    fn walk(&mut self, rel_dir: &str, abs_dir: &Path, mut entries: Vec<Entry>, walk: &mut Walk) {
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        for entry in entries {
            let name = entry.name.to_string_lossy().into_owned();
            let rel_path = if rel_dir.is_empty() {
                name.clone()
            } else {
                format!("{rel_dir}/{name}")
            };
            let abs_path = abs_dir.join(&entry.name);
            let kind = match entry.kind {
                Some(kind) => kind,
                None => match self.fs.lstat(&abs_path) {
                    Ok(stat) => stat.kind,
                    // Gone since the listing: absent, which is evidence.
                    Err(err) if is_absence(&err) => continue,
                    Err(err) => {
                        walk.unreadable(&rel_path, "stat", &err);
                        continue;
                    }
                },
            };
            match kind {
                Kind::Dir if self.rules.prunes_dir(&rel_path) => {}
                Kind::Dir => match self
                    .fs
                    .lstat(&abs_path)
                    .and_then(|stat| self.fs.list(&abs_path).map(|children| (stat, children)))
                {
                    Ok((stat, children)) => {
                        self.note_device(&rel_path, stat.device);
                        let device = walk.device_form(stat.device);
                        walk.scan.listed.insert(rel_path.clone(), device);
                        self.walk(&rel_path, &abs_path, children, walk);
                    }
                    Err(err) if is_absence(&err) => {}
                    Err(err) => walk.unreadable(&rel_path, "list", &err),
                },
                Kind::Symlink if self.rules.wants(&rel_path) => {
                    walk.problems.notes.insert(
                        rel_path.clone(),
                        format!("skipping symbolic link {rel_path:?}: links are not followed"),
                    );
                }
                Kind::File if self.rules.wants(&rel_path) => {
                    let root_device = walk.root_device;
                    let stat = |fs: &F| {
                        fs.lstat(&abs_path).map(|stat| Observation {
                            identity: FileIdentity {
                                device: device_form(stat.device, root_device),
                                inode: stat.inode,
                            },
                            size: stat.size,
                            mtime_ns: stat.mtime_ns,
                            abs_path: Arc::from(abs_path.as_path()),
                            rel_path: Arc::from(rel_path.as_str()),
                        })
                    };
                    match self.observe(&rel_path, walk.now, stat) {
                        Ok(observation) => walk.scan.files.push(observation),
                        Err(err) if is_absence(&err) => {}
                        Err(err) => walk.unreadable(&rel_path, "stat", &err),
                    }
                }
                Kind::File | Kind::Symlink | Kind::Other => {}
            }
        }
    }
}

impl<F: FileSystem> DirectoryLister for FsLister<F> {
    fn scan(&mut self) -> Scan {
        self.poll += 1;
        let mut walk = Walk {
            scan: Scan::default(),
            problems: Problems::default(),
            now: Instant::now(),
            root_device: 0,
        };
        let root = self.root.clone();
        match self
            .fs
            .stat(&root)
            .and_then(|stat| self.fs.list(&root).map(|entries| (stat, entries)))
        {
            // The coordinator reports a blind watch directory.
            Err(err) => {
                walk.scan.blind = Some(format!(
                    "watch directory {} is not readable ({}: {err})",
                    root.display(),
                    errno_name(&err)
                ));
            }
            Ok((stat, entries)) => {
                if let Some(before) = self.root_device.replace(stat.device)
                    && before != stat.device
                {
                    walk.scan.blind = Some(format!(
                        "watch directory {} is another file system than a moment ago (device {before} is now {}): remounted, or the mount dropped away",
                        root.display(),
                        stat.device
                    ));
                }
                walk.scan.root_entries = entries.len();
                walk.root_device = stat.device;
                walk.scan.listed.insert(String::new(), WATCH_DIR_DEVICE);
                self.walk("", &root, entries, &mut walk);
            }
        }
        // Files the walk did not reach this time (gone, or under an
        // unreadable directory) lose their cached stat.
        let poll = self.poll;
        self.stats.retain(|_, stat| stat.seen_poll == poll);
        if walk.scan.blind.is_none() {
            // A directory that could not be listed this time keeps its
            // device: a mount that aborts a listing and then drops away is
            // still told apart from the directory underneath.
            let scan = &walk.scan;
            self.dir_devices
                .retain(|dir, _| scan.listed.contains_key(dir) || !scan.covers(dir));
        }
        for (level, line) in self.log.lines(walk.problems, walk.now) {
            log::log!(level, "{line}");
        }
        walk.scan
    }
}

#[cfg(test)]
mod tests;
