//! Polling directory lister: one walk of `WATCH_DIR` → a list of observations.
//!
//! Polling, not inotify, because the watched directory is often an NFS or SMB
//! mount where change notifications never arrive. Each pass stats every
//! matching regular file (size, mtime, device, inode) and reports which parts
//! of the tree could not be read, so that an unreadable subtree or a vanished
//! mount is never mistaken for deleted files. Per-entry problems are logged
//! once per path, not once per poll.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use log::warn;
use walkdir::WalkDir;

/// What makes a file the same file across polls and renames: its inode on its
/// device. A new inode at the same path is a different file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileIdentity {
    pub device: u64,
    pub inode: u64,
}

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
    /// Relative to the watch directory, with `/` separators.
    pub rel_path: String,
    pub abs_path: PathBuf,
    pub identity: FileIdentity,
    pub size: u64,
    /// Modification time in nanoseconds since the epoch, as the file system
    /// reports it. Only ever compared for equality: NFS clocks are not trusted.
    pub mtime_ns: i128,
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

/// Walks a real directory tree with walkdir.
pub struct FsLister {
    root: PathBuf,
    extensions: Vec<String>,
    /// Problems already logged, so a permanent problem is logged once.
    reported: HashSet<String>,
}

impl FsLister {
    pub fn new(root: PathBuf, extensions: Vec<String>) -> Self {
        Self {
            root,
            extensions,
            reported: HashSet::new(),
        }
    }

    fn wanted(&self, path: &Path) -> bool {
        path.extension()
            .and_then(|ext| ext.to_str())
            .is_some_and(|ext| self.extensions.iter().any(|w| w.eq_ignore_ascii_case(ext)))
    }

    fn relative(&self, path: &Path) -> String {
        let rel = path.strip_prefix(&self.root).unwrap_or(path);
        rel.components()
            .map(|part| part.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/")
    }
}

fn is_hidden(entry: &walkdir::DirEntry) -> bool {
    entry.depth() > 0 && entry.file_name().to_string_lossy().starts_with('.')
}

impl DirectoryLister for FsLister {
    fn scan(&mut self) -> Scan {
        let mut scan = Scan {
            root_readable: true,
            ..Scan::default()
        };
        let mut problems: Vec<(String, String)> = Vec::new();
        if let Err(err) = std::fs::read_dir(&self.root) {
            scan.root_readable = false;
            problems.push((
                self.root.display().to_string(),
                format!("watch directory {} is not readable: {err}; keeping every stream as it is until it returns", self.root.display()),
            ));
        } else {
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
                match entry.metadata() {
                    Ok(meta) => scan.files.push(Observation {
                        identity: FileIdentity {
                            device: meta.dev(),
                            inode: meta.ino(),
                        },
                        size: meta.len(),
                        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000
                            + i128::from(meta.mtime_nsec()),
                        abs_path: entry.into_path(),
                        rel_path,
                    }),
                    Err(err) => {
                        let parent = rel_path.rsplit_once('/').map_or("", |(dir, _)| dir);
                        scan.unreadable_dirs.push(parent.to_string());
                        problems
                            .push((rel_path.clone(), format!("cannot stat {rel_path:?}: {err}")));
                    }
                }
            }
        }
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
        FsLister::new(root.to_path_buf(), vec!["mp4".into()])
    }

    fn paths(scan: &Scan) -> Vec<String> {
        let mut paths: Vec<String> = scan.files.iter().map(|f| f.rel_path.clone()).collect();
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
            .find(|f| f.rel_path == "a/b/deep.mp4")
            .unwrap();
        assert_eq!(deep.size, 2);
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
