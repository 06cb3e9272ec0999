//! The file system under `WATCH_DIR`, as the scanner sees it.
//!
//! The scanner's decisions hang on how a call failed: `ENOENT` is evidence
//! that a file is gone, while `EIO`, `ESTALE`, `ENOTCONN`, `ETIMEDOUT` or
//! `EACCES` from an NFS, SMB or FUSE mount only say that it cannot be seen
//! right now. So the few calls the scanner makes (list a directory, stat a
//! path, hash the head of a file) sit behind [`FileSystem`], with one real
//! implementation here and a fake in the scanner's tests that fails on cue.
//! The module also reads `/proc/self/mountinfo`, so that start-up can say
//! which file system `WATCH_DIR` is on and whether its attribute cache is
//! longer than `STREAM_TIMEOUT`.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::{info, warn};
use sha2::{Digest, Sha256};

/// What kind of directory entry a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Sockets, FIFOs, devices: never uploaded.
    Other,
}

/// One name in a directory listing. `kind` is `None` when the listing does
/// not say (a FUSE listing served from a cache carries no `d_type`); the
/// scanner then stats the entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: OsString,
    pub kind: Option<Kind>,
}

/// What a stat call returns that the scanner uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub kind: Kind,
    pub device: u64,
    pub inode: u64,
    pub size: u64,
    /// Nanoseconds since the epoch.
    pub mtime_ns: i128,
}

/// The calls the scanner makes.
pub trait FileSystem: Send {
    /// The names in a directory.
    fn list(&self, dir: &Path) -> io::Result<Vec<Entry>>;
    /// Stats `path` without following a final symbolic link.
    fn lstat(&self, path: &Path) -> io::Result<Stat>;
    /// Stats `path`, following symbolic links (for `WATCH_DIR` itself).
    fn stat(&self, path: &Path) -> io::Result<Stat>;
    /// Lower-case hex sha256 of the first `len` bytes of the file; an
    /// `UnexpectedEof` error if the file is shorter.
    fn head_sha256(&self, path: &Path, len: u64) -> io::Result<String>;
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

fn kind_of(file_type: std::fs::FileType) -> Kind {
    if file_type.is_file() {
        Kind::File
    } else if file_type.is_dir() {
        Kind::Dir
    } else if file_type.is_symlink() {
        Kind::Symlink
    } else {
        Kind::Other
    }
}

fn stat_of(meta: &std::fs::Metadata) -> Stat {
    Stat {
        kind: kind_of(meta.file_type()),
        device: meta.dev(),
        inode: meta.ino(),
        size: meta.len(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    }
}

impl FileSystem for RealFs {
    fn list(&self, dir: &Path) -> io::Result<Vec<Entry>> {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            // An error in the middle of a listing makes the whole listing
            // untrustworthy: a missing name in it proves nothing.
            let entry = entry?;
            entries.push(Entry {
                name: entry.file_name(),
                kind: entry.file_type().ok().map(kind_of),
            });
        }
        Ok(entries)
    }

    fn lstat(&self, path: &Path) -> io::Result<Stat> {
        std::fs::symlink_metadata(path).map(|meta| stat_of(&meta))
    }

    fn stat(&self, path: &Path) -> io::Result<Stat> {
        std::fs::metadata(path).map(|meta| stat_of(&meta))
    }

    fn head_sha256(&self, path: &Path, len: u64) -> io::Result<String> {
        let mut file = File::open(path)?.take(len);
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 256 * 1024];
        let mut read_total = 0u64;
        loop {
            let read = file.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            read_total += read as u64;
            hasher.update(&buffer[..read]);
        }
        if read_total < len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} is shorter than {len} bytes", path.display()),
            ));
        }
        Ok(hex::encode(hasher.finalize()))
    }
}

/// Linux errno values the scanner names in its warnings.
const ERRNO_NAMES: [(i32, &str); 22] = [
    (1, "EPERM"),
    (2, "ENOENT"),
    (4, "EINTR"),
    (5, "EIO"),
    (6, "ENXIO"),
    (11, "EAGAIN"),
    (13, "EACCES"),
    (19, "ENODEV"),
    (20, "ENOTDIR"),
    (36, "ENAMETOOLONG"),
    (40, "ELOOP"),
    (100, "ENETDOWN"),
    (101, "ENETUNREACH"),
    (103, "ECONNABORTED"),
    (104, "ECONNRESET"),
    (107, "ENOTCONN"),
    (110, "ETIMEDOUT"),
    (112, "EHOSTDOWN"),
    (113, "EHOSTUNREACH"),
    (116, "ESTALE"),
    (121, "EREMOTEIO"),
    (122, "EDQUOT"),
];

/// `EIO`, `ENOENT`, …, or `errno N`, or the error kind when it is not an OS
/// error.
pub fn errno_name(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(code) => ERRNO_NAMES
            .iter()
            .find(|(known, _)| *known == code)
            .map_or_else(|| format!("errno {code}"), |(_, name)| (*name).to_string()),
        None => format!("{:?}", err.kind()),
    }
}

/// Whether the error says the path does not exist (`ENOENT`, or `ENOTDIR`: a
/// directory on the way is now something else). Every other error says
/// nothing about existence.
pub fn is_absence(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(2 | 20)) || err.kind() == io::ErrorKind::NotFound
}

/// The mount that holds a path, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    /// `nfs`, `nfs4`, `cifs`, `smb3`, `fuse.sshfs`, `ext4`, …
    pub fs_type: String,
    pub source: String,
    /// Per-mount and per-superblock options, comma-separated.
    pub options: String,
}

/// Undoes mountinfo's octal escapes (`\040` is a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount `path` (absolute, symbolic links resolved) lives on: the
/// longest mount point that is a prefix of it, the last one listed winning
/// (a mount over a mount).
pub fn mount_of(mountinfo: &str, path: &Path) -> Option<Mount> {
    let mut best: Option<Mount> = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional…] - type source super-options
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = before.split(' ').collect();
        let mut tail = after.split(' ');
        let (Some(point), Some(options), Some(fs_type), Some(source)) =
            (fields.get(4), fields.get(5), tail.next(), tail.next())
        else {
            continue;
        };
        let mount_point = PathBuf::from(unescape(point));
        if !path.starts_with(&mount_point) {
            continue;
        }
        let longer = best
            .as_ref()
            .is_none_or(|b| mount_point.as_os_str().len() >= b.mount_point.as_os_str().len());
        if longer {
            best = Some(Mount {
                mount_point,
                fs_type: fs_type.to_string(),
                source: unescape(source),
                options: format!("{options},{}", tail.next().unwrap_or("")),
            });
        }
    }
    best
}

impl Mount {
    /// The start-up warning when `stream_timeout` is not longer than the
    /// cache time the mount options name.
    pub fn cache_warning(&self, stream_timeout: Duration) -> Option<String> {
        let (option, cache) = self.cache_time()?;
        (stream_timeout <= cache).then(|| {
            format!(
                "STREAM_TIMEOUT ({}) is not longer than the attribute cache time of WATCH_DIR's mount ({option}): a growing file can look unchanged for that long and be completed too early; set STREAM_TIMEOUT above {} or shorten the cache (see docs/operations.md)",
                humantime::format_duration(stream_timeout),
                humantime::format_duration(cache)
            )
        })
    }

    /// The longest attribute or directory cache time the mount options name,
    /// and which option it is: `actimeo`, `acregmax`, `acdirmax` (NFS, SMB),
    /// or NFS's default of 60 s when nothing is said. `None` when the options
    /// name no cache time, or with `noac`.
    pub fn cache_time(&self) -> Option<(String, Duration)> {
        let options: Vec<&str> = self.options.split(',').collect();
        if options.contains(&"noac") {
            return None;
        }
        let named = options
            .iter()
            .filter_map(|option| {
                let (key, value) = option.split_once('=')?;
                matches!(key, "actimeo" | "acregmax" | "acdirmax")
                    .then(|| Some((key.to_string(), value.parse::<u64>().ok()?)))
                    .flatten()
            })
            .max_by_key(|(_, seconds)| *seconds);
        match named {
            Some((key, seconds)) => {
                Some((format!("{key}={seconds}"), Duration::from_secs(seconds)))
            }
            None if self.fs_type.starts_with("nfs") => Some((
                "the NFS default acregmax/acdirmax of 60 s".to_string(),
                Duration::from_secs(60),
            )),
            None => None,
        }
    }
}

/// Logs which file system `watch_dir` is on, and warns when `stream_timeout`
/// is not longer than an attribute cache time named in its mount options (a
/// growing file can then look quiet long enough to be completed early).
pub fn report_mount(watch_dir: &Path, stream_timeout: Duration) {
    let path = std::fs::canonicalize(watch_dir).unwrap_or_else(|_| watch_dir.to_path_buf());
    let mount = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|mountinfo| mount_of(&mountinfo, &path));
    let Some(mount) = mount else {
        info!(
            "WATCH_DIR {}: its mount is not in /proc/self/mountinfo",
            path.display()
        );
        return;
    };
    info!(
        "WATCH_DIR {} is on {} ({} mounted at {}; options {})",
        path.display(),
        mount.fs_type,
        mount.source,
        mount.mount_point.display(),
        mount.options
    );
    if let Some(warning) = mount.cache_warning(stream_timeout) {
        warn!("{warning}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
a line that is not a mount
40 22 0:45 / /mnt/nas rw,relatime shared:20 - nfs4 nas:/export rw,vers=4.2,hard,proto=tcp,acregmax=30,acdirmax=45
41 22 0:46 / /mnt/cams\\040a rw,nosuid - cifs //nas/cams rw,vers=3.1.1,serverino,actimeo=1
42 22 0:47 / /mnt/ssh rw,nosuid,nodev - fuse.sshfs root@127.0.0.1:/srv rw,user_id=0,group_id=0,allow_other
43 22 0:48 / /mnt/plain rw - nfs srv:/x rw,vers=3,hard
";

    #[test]
    fn the_mount_of_a_path_is_the_longest_matching_mount_point() {
        let nas = mount_of(MOUNTINFO, Path::new("/mnt/nas/cams/a")).unwrap();
        assert_eq!(nas.fs_type, "nfs4");
        assert_eq!(nas.source, "nas:/export");
        assert_eq!(
            nas.cache_time(),
            Some(("acdirmax=45".to_string(), Duration::from_secs(45)))
        );
        let cifs = mount_of(MOUNTINFO, Path::new("/mnt/cams a/x")).unwrap();
        assert_eq!(cifs.fs_type, "cifs");
        assert_eq!(cifs.cache_time().unwrap().1, Duration::from_secs(1));
        let ssh = mount_of(MOUNTINFO, Path::new("/mnt/ssh")).unwrap();
        assert_eq!(ssh.fs_type, "fuse.sshfs");
        assert_eq!(ssh.cache_time(), None);
        let plain = mount_of(MOUNTINFO, Path::new("/mnt/plain")).unwrap();
        assert_eq!(plain.cache_time().unwrap().1, Duration::from_secs(60));
        let root = mount_of(MOUNTINFO, Path::new("/home/x")).unwrap();
        assert_eq!(root.fs_type, "ext4");
        assert_eq!(root.cache_time(), None);
    }

    #[test]
    fn a_stream_timeout_within_the_cache_time_is_warned_about() {
        let nas = mount_of(MOUNTINFO, Path::new("/mnt/nas")).unwrap();
        let warning = nas.cache_warning(Duration::from_secs(30)).unwrap();
        assert!(warning.contains("STREAM_TIMEOUT (30s)"), "{warning}");
        assert!(warning.contains("acdirmax=45"), "{warning}");
        assert_eq!(nas.cache_warning(Duration::from_secs(46)), None);
        let plain = mount_of(MOUNTINFO, Path::new("/mnt/plain")).unwrap();
        assert!(plain.cache_warning(Duration::from_secs(60)).is_some());
        let ssh = mount_of(MOUNTINFO, Path::new("/mnt/ssh")).unwrap();
        assert_eq!(ssh.cache_warning(Duration::from_secs(1)), None);
    }

    #[test]
    fn errors_are_named_and_only_enoent_is_absence() {
        let enoent = io::Error::from_raw_os_error(2);
        assert_eq!(errno_name(&enoent), "ENOENT");
        assert!(is_absence(&enoent));
        for (code, name) in [
            (5, "EIO"),
            (107, "ENOTCONN"),
            (116, "ESTALE"),
            (13, "EACCES"),
        ] {
            let err = io::Error::from_raw_os_error(code);
            assert_eq!(errno_name(&err), name);
            assert!(!is_absence(&err), "{name} is not absence");
        }
        assert_eq!(errno_name(&io::Error::from_raw_os_error(999)), "errno 999");
    }

    #[test]
    fn the_head_hash_covers_exactly_len_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abcdef").unwrap();
        assert_eq!(
            RealFs.head_sha256(&path, 3).unwrap(),
            crate::metadata::sha256_hex(b"abc")
        );
        assert_eq!(
            RealFs.head_sha256(&path, 7).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
