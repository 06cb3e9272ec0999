//! The walk against a real directory and a fake file system: what is seen, what is unreadable, what proves a file gone.

use super::*;
use std::fs;

fn lister(root: &Path) -> FsLister {
    FsLister::new(
        root.to_path_buf(),
        Rules::default(),
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
    assert!(scan.blind.is_none());
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
    let mut lister = FsLister::new(dir.path().to_path_buf(), Rules::default(), Duration::ZERO);
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
    assert!(scan.blind.is_some());
    assert!(!scan.covers("anything.mp4"));
}

#[test]
fn coverage_excludes_unreadable_subtrees_only() {
    let scan = Scan {
        unreadable: vec!["cams/a".into(), "top.mp4".into()],
        ..Scan::clear(vec![])
    };
    assert!(!scan.covers("cams/a/x.mp4"));
    assert!(!scan.covers("cams/a"));
    assert!(scan.covers("cams/ab/x.mp4"));
    assert!(scan.covers("x.mp4"));
    assert!(!scan.covers("top.mp4"), "an unreadable file covers itself");
    assert!(scan.covers("top.mp4.mp4"));
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

/// A file system in memory that fails on cue, to test how the scanner
/// classifies errors.
#[derive(Default)]
struct FakeFs {
    /// Path → kind and inode; files have size = inode.
    nodes: std::collections::BTreeMap<PathBuf, (Kind, u64)>,
    device: u64,
    /// Listings that carry no file type (a FUSE cache).
    untyped: bool,
    /// Path → errno for `list` and for `stat`/`lstat`.
    list_fails: HashMap<PathBuf, i32>,
    stat_fails: HashMap<PathBuf, i32>,
}

impl FakeFs {
    fn with(paths: &[(&str, Kind)]) -> Self {
        let mut fs = FakeFs {
            device: 7,
            ..FakeFs::default()
        };
        fs.nodes.insert(PathBuf::from("/w"), (Kind::Dir, 1));
        for (inode, (path, kind)) in paths.iter().enumerate() {
            fs.nodes
                .insert(Path::new("/w").join(path), (*kind, inode as u64 + 2));
        }
        fs
    }

    fn fail(map: &HashMap<PathBuf, i32>, path: &Path) -> io::Result<()> {
        match map.get(path) {
            Some(errno) => Err(io::Error::from_raw_os_error(*errno)),
            None => Ok(()),
        }
    }
}

impl FileSystem for FakeFs {
    fn list(&self, dir: &Path) -> io::Result<Vec<Entry>> {
        Self::fail(&self.list_fails, dir)?;
        if !self.nodes.contains_key(dir) {
            return Err(io::Error::from_raw_os_error(2));
        }
        Ok(self
            .nodes
            .iter()
            .filter(|(path, _)| path.parent() == Some(dir))
            .map(|(path, (kind, _))| Entry {
                name: path.file_name().unwrap().to_os_string(),
                kind: (!self.untyped).then_some(*kind),
            })
            .collect())
    }

    fn lstat(&self, path: &Path) -> io::Result<crate::watchfs::Stat> {
        Self::fail(&self.stat_fails, path)?;
        let (kind, inode) = self
            .nodes
            .get(path)
            .ok_or_else(|| io::Error::from_raw_os_error(2))?;
        Ok(crate::watchfs::Stat {
            kind: *kind,
            device: self.device,
            inode: *inode,
            size: *inode,
            mtime_ns: 0,
        })
    }

    fn stat(&self, path: &Path) -> io::Result<crate::watchfs::Stat> {
        self.lstat(path)
    }

    fn head_sha256(&self, _path: &Path, _len: u64) -> io::Result<String> {
        Err(io::Error::from_raw_os_error(5))
    }
}

fn fake_lister(fs: FakeFs) -> FsLister<FakeFs> {
    FsLister::with_fs(
        fs,
        PathBuf::from("/w"),
        Rules::default(),
        Duration::from_secs(3600),
    )
}

const TREE: [(&str, Kind); 4] = [
    ("top.mp4", Kind::File),
    ("cams", Kind::Dir),
    ("cams/a.mp4", Kind::File),
    ("cams/b.mp4", Kind::File),
];

#[test]
fn a_file_at_the_root_whose_stat_fails_is_unreadable_not_missing() {
    for errno in [5, 13, 107, 110, 116] {
        let mut fs = FakeFs::with(&TREE);
        fs.stat_fails.insert("/w/top.mp4".into(), errno);
        let scan = fake_lister(fs).scan();
        assert!(scan.blind.is_none());
        assert_eq!(paths(&scan), vec!["cams/a.mp4", "cams/b.mp4"]);
        assert!(!scan.covers("top.mp4"), "errno {errno}: no evidence");
        assert!(scan.covers("cams/a.mp4") && scan.covers("other.mp4"));
        assert_eq!(scan.unreadable_count(), 1);
    }
}

#[test]
fn a_file_deeper_down_whose_stat_fails_in_the_walk_is_unreadable() {
    // Without file types in the listing, the walk itself stats entries.
    let mut fs = FakeFs::with(&TREE);
    fs.untyped = true;
    fs.stat_fails.insert("/w/cams/a.mp4".into(), 5);
    let scan = fake_lister(fs).scan();
    assert_eq!(paths(&scan), vec!["cams/b.mp4", "top.mp4"]);
    assert!(!scan.covers("cams/a.mp4"));
    assert!(scan.covers("cams/c.mp4"));
}

#[test]
fn an_unlistable_directory_covers_nothing_below_it() {
    let mut fs = FakeFs::with(&TREE);
    fs.list_fails.insert("/w/cams".into(), 13);
    let scan = fake_lister(fs).scan();
    assert_eq!(paths(&scan), vec!["top.mp4"]);
    assert!(!scan.covers("cams/a.mp4"));
    assert!(scan.covers("top.mp4"));
}

#[test]
fn enoent_from_stat_is_absence() {
    // Listed, then gone before its stat: absent, which is evidence.
    let mut fs = FakeFs::with(&TREE);
    fs.stat_fails.insert("/w/top.mp4".into(), 2);
    let scan = fake_lister(fs).scan();
    assert!(scan.covers("top.mp4"));
    assert_eq!(scan.unreadable_count(), 0);
}

#[test]
fn an_unreadable_or_replaced_root_makes_the_scan_blind() {
    let mut lister = fake_lister(FakeFs::with(&TREE));
    assert!(lister.scan().blind.is_none());
    lister.fs.list_fails.insert("/w".into(), 107);
    let scan = lister.scan();
    assert!(scan.blind.as_deref().unwrap().contains("ENOTCONN"));
    assert!(scan.files.is_empty() && !scan.covers("top.mp4"));
    lister.fs.list_fails.clear();
    assert!(lister.scan().blind.is_none(), "the same file system again");
    // Remounted (or the mount dropped to the local directory below).
    lister.fs.device = 8;
    let scan = lister.scan();
    assert!(
        scan.blind
            .as_deref()
            .unwrap()
            .contains("another file system")
    );
    assert!(lister.scan().blind.is_none(), "blind for one scan only");
}

#[test]
fn an_empty_root_is_seen_as_empty() {
    let mut lister = fake_lister(FakeFs::with(&[]));
    let scan = lister.scan();
    assert!(scan.blind.is_none());
    assert_eq!(scan.root_entries, 0);
}

#[test]
fn listed_directories_carry_their_device() {
    let scan = fake_lister(FakeFs::with(&TREE)).scan();
    assert_eq!(scan.listed.get("cams"), Some(&WATCH_DIR_DEVICE));
    assert!(scan.proves_absent("cams/gone.mp4", WATCH_DIR_DEVICE));
    assert!(scan.proves_absent("cams/sub/gone.mp4", WATCH_DIR_DEVICE));
    assert!(
        !scan.proves_absent("cams/gone.mp4", 9),
        "a file from another file system is not absent from this one"
    );
}
