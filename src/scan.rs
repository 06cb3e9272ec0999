//! Polling directory lister: one walk of `WATCH_DIR` → a list of observations.
//!
//! Polling, not inotify, because the watched directory is often an NFS or SMB
//! mount where change notifications never arrive. Each pass stats every
//! matching regular file (size, mtime, device, inode) and reports which parts
//! of the tree could not be read, so that an unreadable subtree or a vanished
//! mount is never mistaken for deleted files. Per-entry problems are logged
//! once per path, not once per poll.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::warn;
use walkdir::WalkDir;

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
    /// False when the watch directory itself could not be read (for example an
    /// NFS mount that went away). Nothing may be concluded about missing files.
    pub root_readable: bool,
    /// Relative paths of subdirectories that could not be read this time; files
    /// under them are in an unknown state, not missing.
    pub unreadable_dirs: Vec<String>,
}

impl Scan {
    /// Whether an absent file at `rel_path` can be trusted to be really absent.
    pub fn covers(&self, rel_path: &str) -> bool {
        self.root_readable
            && !self.unreadable_dirs.iter().any(|dir| {
                rel_path
                    .strip_prefix(dir.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
            })
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

/// Walks a real directory tree with walkdir.
///
/// Stat calls dominate the cost of a poll (the kernel resolves every path).
/// So, like Vector's file source, files unchanged for longer than
/// `cold_after` are stat'ed less often: every 2, 4, … up to
/// [`MAX_COLD_SKIP_POLLS`] polls, with the last stat reported in between. The
/// directory walk itself still sees every file on every poll, so a deleted or
/// renamed file is noticed at once; a change *inside* a cold file (it grows
/// again, or is replaced at the same path) is noticed within
/// `MAX_COLD_SKIP_POLLS` polls.
pub struct FsLister {
    root: PathBuf,
    extensions: Vec<String>,
    /// Problems already logged, so a permanent problem is logged once.
    reported: HashSet<String>,
    cold_after: Duration,
    stats: HashMap<String, Stat>,
    poll: u64,
}

impl FsLister {
    pub fn new(root: PathBuf, extensions: Vec<String>, cold_after: Duration) -> Self {
        Self {
            root,
            extensions,
            reported: HashSet::new(),
            cold_after,
            stats: HashMap::new(),
            poll: 0,
        }
    }

    /// The observation for `rel_path`: the cached one while the file is cold
    /// and not due, else a fresh stat (via `stat`). The cache is updated in
    /// place; entries not seen in this poll are pruned after the walk.
    fn observe(
        &mut self,
        rel_path: &str,
        now: Instant,
        stat: impl FnOnce() -> std::io::Result<Observation>,
    ) -> std::io::Result<Observation> {
        let poll = self.poll;
        if let Some(cached) = self.stats.get_mut(rel_path)
            && poll < cached.next_stat_poll
        {
            cached.seen_poll = poll;
            return Ok(cached.observation.clone());
        }
        let observation = stat()?;
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

    fn wanted(&self, path: &Path) -> bool {
        path.extension()
            .and_then(|ext| ext.to_str())
            .is_some_and(|ext| self.extensions.iter().any(|w| w.eq_ignore_ascii_case(ext)))
    }

    /// The path relative to the root; on Unix the separator is already `/`.
    fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned()
    }
}

fn is_hidden(entry: &walkdir::DirEntry) -> bool {
    entry.depth() > 0 && entry.file_name().to_string_lossy().starts_with('.')
}

impl DirectoryLister for FsLister {
    fn scan(&mut self) -> Scan {
        self.poll += 1;
        let now = Instant::now();
        let mut scan = Scan {
            root_readable: true,
            ..Scan::default()
        };
        let mut problems: Vec<(String, String)> = Vec::new();
        match std::fs::read_dir(&self.root).and_then(|_| std::fs::metadata(&self.root)) {
            Err(err) => {
                scan.root_readable = false;
                problems.push((
                    self.root.display().to_string(),
                    format!(
                        "watch directory {} is not readable: {err}; keeping every stream as it is until it returns",
                        self.root.display()
                    ),
                ));
            }
            Ok(root) => {
                let root_device = root.dev();
                let walker = WalkDir::new(&self.root)
                    .follow_links(false)
                    .into_iter()
                    .filter_entry(|entry| !is_hidden(entry));
                for entry in walker {
                    let entry = match entry {
                        Ok(entry) => entry,
                        Err(err) => {
                            let path = err.path().map(|p| self.relative(p)).unwrap_or_default();
                            if err.depth() == 0 {
                                scan.root_readable = false;
                            } else if err.loop_ancestor().is_none() {
                                scan.unreadable_dirs.push(path.clone());
                            }
                            problems.push((path.clone(), format!("skipping {path:?}: {err}")));
                            continue;
                        }
                    };
                    let file_type = entry.file_type();
                    if file_type.is_symlink() && self.wanted(entry.path()) {
                        let rel = self.relative(entry.path());
                        problems.push((
                            rel.clone(),
                            format!("skipping symbolic link {rel:?}: links are not followed"),
                        ));
                        continue;
                    }
                    if !file_type.is_file() || !self.wanted(entry.path()) {
                        continue;
                    }
                    let rel_path = self.relative(entry.path());
                    let stat = || {
                        entry
                            .metadata()
                            .map_err(std::io::Error::from)
                            .map(|meta| Observation {
                                identity: FileIdentity {
                                    device: if meta.dev() == root_device {
                                        WATCH_DIR_DEVICE
                                    } else {
                                        meta.dev()
                                    },
                                    inode: meta.ino(),
                                },
                                size: meta.len(),
                                mtime_ns: i128::from(meta.mtime()) * 1_000_000_000
                                    + i128::from(meta.mtime_nsec()),
                                abs_path: Arc::from(entry.path()),
                                rel_path: Arc::from(rel_path.as_str()),
                            })
                    };
                    match self.observe(&rel_path, now, stat) {
                        Ok(observation) => scan.files.push(observation),
                        Err(err) => {
                            let parent = rel_path.rsplit_once('/').map_or("", |(dir, _)| dir);
                            scan.unreadable_dirs.push(parent.to_string());
                            problems.push((
                                rel_path.clone(),
                                format!("cannot stat {rel_path:?}: {err}"),
                            ));
                        }
                    }
                }
            }
        }
        // Files the walk did not reach this time (gone, or under an
        // unreadable directory) lose their cached stat.
        let poll = self.poll;
        self.stats.retain(|_, stat| stat.seen_poll == poll);
        let mut now_reported = HashSet::with_capacity(problems.len());
        for (path, message) in problems {
            if !self.reported.contains(&path) {
                warn!("{message}");
            }
            now_reported.insert(path);
        }
        self.reported = now_reported;
        scan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn lister(root: &Path) -> FsLister {
        FsLister::new(
            root.to_path_buf(),
            vec!["mp4".into()],
            Duration::from_secs(3600),
        )
    }

    fn paths(scan: &Scan) -> Vec<String> {
        let mut paths: Vec<String> = scan.files.iter().map(|f| f.rel_path.to_string()).collect();
        paths.sort();
        paths
    }

    #[test]
    fn finds_matching_regular_files_recursively_and_skips_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::create_dir_all(root.join(".hidden")).unwrap();
        fs::create_dir_all(root.join("dir.mp4")).unwrap();
        fs::write(root.join("top.MP4"), b"x").unwrap();
        fs::write(root.join("a/b/deep.mp4"), b"xy").unwrap();
        fs::write(root.join(".dot.mp4"), b"x").unwrap();
        fs::write(root.join(".hidden/in.mp4"), b"x").unwrap();
        fs::write(root.join("a/rec.mp4.part"), b"x").unwrap();
        fs::write(root.join("a/rec.mp4.tmp"), b"x").unwrap();
        fs::write(root.join("notes.txt"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("top.MP4"), root.join("link.mp4")).unwrap();
        std::os::unix::fs::symlink(root.join("missing"), root.join("broken.mp4")).unwrap();

        let scan = lister(root).scan();
        assert!(scan.root_readable);
        assert_eq!(paths(&scan), vec!["a/b/deep.mp4", "top.MP4"]);
        let deep = scan
            .files
            .iter()
            .find(|f| &*f.rel_path == "a/b/deep.mp4")
            .unwrap();
        assert_eq!(deep.size, 2);
    }

    #[test]
    fn cold_files_are_stated_less_often_but_changes_show_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cold.mp4");
        fs::write(&path, b"12345").unwrap();
        fs::write(dir.path().join("other.mp4"), b"x").unwrap();
        // Cold at once, for the test.
        let mut lister =
            FsLister::new(dir.path().to_path_buf(), vec!["mp4".into()], Duration::ZERO);
        let size_of = |scan: &Scan| {
            scan.files
                .iter()
                .find(|f| &*f.rel_path == "cold.mp4")
                .map(|f| f.size)
        };
        for _ in 0..40 {
            lister.scan();
        }
        fs::write(&path, b"123456789").unwrap();
        let mut polls_until_seen = 0;
        loop {
            polls_until_seen += 1;
            let scan = lister.scan();
            assert_eq!(scan.files.len(), 2, "every file is still listed");
            if size_of(&scan) == Some(9) {
                break;
            }
            assert_eq!(size_of(&scan), Some(5), "the cached stat in between");
            assert!(
                polls_until_seen <= MAX_COLD_SKIP_POLLS + 1,
                "noticed within the bound"
            );
        }
        assert!(
            polls_until_seen > 1,
            "a cold file is not stat'ed on every poll"
        );
        // A deleted cold file is gone from the very next poll.
        fs::remove_file(&path).unwrap();
        assert_eq!(size_of(&lister.scan()), None);
    }

    #[test]
    fn a_missing_root_is_unreadable_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let mut lister = lister(&dir.path().join("gone"));
        let scan = lister.scan();
        assert!(!scan.root_readable);
        assert!(!scan.covers("anything.mp4"));
    }

    #[test]
    fn coverage_excludes_unreadable_subtrees_only() {
        let scan = Scan {
            files: vec![],
            root_readable: true,
            unreadable_dirs: vec!["cams/a".into()],
        };
        assert!(!scan.covers("cams/a/x.mp4"));
        assert!(scan.covers("cams/ab/x.mp4"));
        assert!(scan.covers("x.mp4"));
    }

    #[test]
    fn identity_keys_round_trip() {
        let id = FileIdentity {
            device: 2049,
            inode: 123456789,
        };
        assert_eq!(FileIdentity::parse_key(&id.key()), Some(id));
        assert_eq!(FileIdentity::parse_key("nope"), None);
    }
}
