//! `chunkstream scan`: a dry run of the include/exclude rules.
//!
//! Before pointing the daemon at a site's recordings an operator wants to see
//! what it would take. This walks `WATCH_DIR` with the configured [`Rules`]
//! and says, for every file, whether it would be uploaded, why it is skipped,
//! or that Redis already records it as complete at its current size. It
//! uploads nothing and writes nothing, and it is kept apart from the
//! daemon's lister (which reports only wanted files) so the lister stays lean.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use crate::rules::{Decision, Rules};
use crate::store::StoredStatus;
use crate::store::ports::Loaded;

/// What would happen to one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Upload,
    /// Complete in Redis at this size.
    Done,
    Skip(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to `WATCH_DIR`; directories end in `/`.
    pub rel_path: String,
    pub size: u64,
    pub verdict: Verdict,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.verdict {
            Verdict::Upload => write!(f, "upload  {} ({} bytes)", self.rel_path, self.size),
            Verdict::Done => write!(f, "done    {} ({} bytes)", self.rel_path, self.size),
            Verdict::Skip(why) => write!(f, "skip    {} ({why})", self.rel_path),
        }
    }
}

/// Paths Redis records as complete, with their size at completion. A record
/// that does not parse counts as not done (the daemon quarantines it).
pub fn completed(streams: &[Loaded]) -> HashMap<String, u64> {
    streams
        .iter()
        .filter_map(|loaded| loaded.as_ref().ok())
        .filter(|stream| stream.status == StoredStatus::Complete)
        .map(|stream| (stream.rel_path.clone(), stream.completed_size))
        .collect()
}

/// Walks `root` (depth first, sorted by name) and decides every entry.
pub fn plan(root: &Path, rules: &Rules, done: &HashMap<String, u64>) -> Vec<Entry> {
    let mut entries = Vec::new();
    walk(root, "", rules, done, &mut entries);
    entries
}

fn walk(
    dir: &Path,
    rel_dir: &str,
    rules: &Rules,
    done: &HashMap<String, u64>,
    out: &mut Vec<Entry>,
) {
    let mut children: Vec<_> = match std::fs::read_dir(dir) {
        Ok(listing) => listing.filter_map(Result::ok).collect(),
        Err(err) => {
            out.push(Entry {
                rel_path: format!("{rel_dir}/"),
                size: 0,
                verdict: Verdict::Skip(format!("cannot list: {err}")),
            });
            return;
        }
    };
    children.sort_by_key(|child| child.file_name());
    for child in children {
        let name = child.file_name().to_string_lossy().into_owned();
        let rel_path = if rel_dir.is_empty() {
            name
        } else {
            format!("{rel_dir}/{name}")
        };
        let skip = |why: String| Entry {
            rel_path: rel_path.clone(),
            size: 0,
            verdict: Verdict::Skip(why),
        };
        let meta = match std::fs::symlink_metadata(child.path()) {
            Ok(meta) => meta,
            Err(err) => {
                out.push(skip(format!("cannot stat: {err}")));
                continue;
            }
        };
        if meta.is_dir() {
            match rules.decide(&rel_path) {
                Decision::Excluded(pattern) => out.push(Entry {
                    rel_path: format!("{rel_path}/"),
                    size: 0,
                    verdict: Verdict::Skip(format!(
                        "directory excluded by EXCLUDE pattern {pattern:?}"
                    )),
                }),
                _ => walk(&child.path(), &rel_path, rules, done, out),
            }
            continue;
        }
        let verdict = match rules.decide(&rel_path) {
            Decision::Excluded(pattern) => {
                Verdict::Skip(format!("excluded by EXCLUDE pattern {pattern:?}"))
            }
            Decision::NotIncluded => {
                Verdict::Skip("matches no INCLUDE pattern (or FILE_EXTENSIONS)".into())
            }
            Decision::Upload if meta.is_symlink() => {
                Verdict::Skip("symbolic link: links are not followed".into())
            }
            Decision::Upload if !meta.is_file() => Verdict::Skip("not a regular file".into()),
            Decision::Upload if done.get(&rel_path) == Some(&meta.len()) => Verdict::Done,
            Decision::Upload => Verdict::Upload,
        };
        out.push(Entry {
            rel_path,
            size: meta.len(),
            verdict,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_gets_a_verdict_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("cam/.cache")).unwrap();
        std::fs::write(root.join("cam/a.mp4"), b"12345").unwrap();
        std::fs::write(root.join("cam/b.mp4"), b"123").unwrap();
        std::fs::write(root.join("cam/c.mp4.part"), b"1").unwrap();
        std::fs::write(root.join("cam/.cache/d.mp4"), b"1").unwrap();
        std::fs::write(root.join("notes.txt"), b"1").unwrap();
        let done = HashMap::from([("cam/a.mp4".to_string(), 5), ("cam/b.mp4".to_string(), 2)]);
        let verdicts: Vec<(String, Verdict)> = plan(root, &Rules::default(), &done)
            .into_iter()
            .map(|entry| (entry.rel_path, entry.verdict))
            .collect();
        let skip = |why: &str| Verdict::Skip(why.to_string());
        assert_eq!(
            verdicts,
            vec![
                (
                    "cam/.cache/".into(),
                    skip("directory excluded by EXCLUDE pattern \".*\"")
                ),
                ("cam/a.mp4".into(), Verdict::Done),
                // Grew since it completed: it would be uploaded again.
                ("cam/b.mp4".into(), Verdict::Upload),
                (
                    "cam/c.mp4.part".into(),
                    skip("excluded by EXCLUDE pattern \"*.part\"")
                ),
                (
                    "notes.txt".into(),
                    skip("matches no INCLUDE pattern (or FILE_EXTENSIONS)")
                ),
            ]
        );
    }
}
