//! Which files are uploaded: `INCLUDE`, `EXCLUDE` and the `FILE_EXTENSIONS`
//! shorthand, as one [`Rules`] value the directory lister and `chunkstream
//! scan` consult.
//!
//! Patterns are globs (the `globset` crate) on the path relative to
//! `WATCH_DIR`, with `/` as separator: `*` stays within one directory, `**`
//! spans any depth. As in `.gitignore`, a pattern without a `/` matches a
//! name at any depth (`*.tmp` is `**/*.tmp`). An excluded directory is not
//! walked, and exclusion wins over inclusion. With `INCLUDE` empty,
//! `FILE_EXTENSIONS=mp4,mov` stands for `INCLUDE=*.mp4,*.mov`
//! (case-insensitive). The default `EXCLUDE` leaves out hidden files and
//! directories and common partial files; setting `EXCLUDE` replaces it, so
//! `EXCLUDE=` re-includes them.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

use crate::error::ConfigError;

/// The default of `EXCLUDE`.
pub const DEFAULT_EXCLUDE: &str = ".*,*.part,*.tmp,.~*";

/// What the rules say about one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Upload,
    /// Matched no `INCLUDE` pattern (nor `FILE_EXTENSIONS`).
    NotIncluded,
    /// Matched this `EXCLUDE` pattern, itself or through a parent directory.
    Excluded(String),
}

/// The compiled patterns.
#[derive(Debug, Clone)]
pub struct Rules {
    include: GlobSet,
    exclude: GlobSet,
    exclude_patterns: Vec<String>,
}

impl Rules {
    /// Compiles the settings; a pattern that does not parse names its variable.
    pub fn parse(include: &str, exclude: &str, extensions: &[String]) -> Result<Self, ConfigError> {
        let include = match split(include) {
            patterns if patterns.is_empty() => {
                let shorthand: Vec<String> =
                    extensions.iter().map(|ext| format!("*.{ext}")).collect();
                set("FILE_EXTENSIONS", include, &shorthand, true)?
            }
            patterns => set("INCLUDE", include, &patterns, false)?,
        };
        let exclude_patterns = split(exclude);
        let exclude = set("EXCLUDE", exclude, &exclude_patterns, false)?;
        Ok(Self {
            include,
            exclude,
            exclude_patterns,
        })
    }

    /// Whether the walk skips the directory at `rel_dir` (and all below it).
    pub fn prunes_dir(&self, rel_dir: &str) -> bool {
        self.exclude.is_match(rel_dir)
    }

    /// The decision for a file at `rel_path`, parents included.
    pub fn decide(&self, rel_path: &str) -> Decision {
        let parents = rel_path.match_indices('/').map(|(at, _)| &rel_path[..at]);
        for candidate in parents.chain(std::iter::once(rel_path)) {
            if let Some(&first) = self.exclude.matches(candidate).first() {
                return Decision::Excluded(self.exclude_patterns[first].clone());
            }
        }
        if self.include.is_match(rel_path) {
            Decision::Upload
        } else {
            Decision::NotIncluded
        }
    }

    /// The file at `rel_path` is uploaded (its directory was not pruned).
    pub fn wants(&self, rel_path: &str) -> bool {
        !self.exclude.is_match(rel_path) && self.include.is_match(rel_path)
    }
}

impl Default for Rules {
    /// The binary's defaults: `*.mp4`, hidden and partial files excluded.
    fn default() -> Self {
        Self::parse("", DEFAULT_EXCLUDE, &["mp4".into()]).expect("the defaults parse")
    }
}

/// Comma-separated patterns; commas inside `{a,b}` belong to the pattern.
fn split(value: &str) -> Vec<String> {
    let mut patterns = Vec::new();
    let mut current = String::new();
    let mut depth = 0usize;
    for c in value.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                patterns.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    patterns.push(current);
    patterns
        .into_iter()
        .map(|pattern| pattern.trim().to_string())
        .filter(|pattern| !pattern.is_empty())
        .collect()
}

/// One variable's patterns as a set; errors name `variable`.
fn set(
    variable: &'static str,
    value: &str,
    patterns: &[String],
    case_insensitive: bool,
) -> Result<GlobSet, ConfigError> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        set.add(
            compile(pattern, case_insensitive)
                .map_err(|why| ConfigError::bad_value(variable, value, why))?,
        );
    }
    set.build()
        .map_err(|err| ConfigError::bad_value(variable, value, err.to_string()))
}

fn compile(pattern: &str, case_insensitive: bool) -> Result<Glob, String> {
    let anchored = pattern.trim_start_matches('/');
    let full = if pattern.contains('/') {
        anchored.to_string()
    } else {
        format!("**/{anchored}")
    };
    GlobBuilder::new(&full)
        .literal_separator(true)
        .case_insensitive(case_insensitive)
        .build()
        .map_err(|err| format!("pattern {pattern:?}: {}", err.kind()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(include: &str, exclude: &str) -> Rules {
        Rules::parse(include, exclude, &["mp4".into()]).unwrap()
    }

    #[test]
    fn file_extensions_are_the_include_shorthand() {
        let r = rules("", DEFAULT_EXCLUDE);
        assert_eq!(r.decide("cam/a.MP4"), Decision::Upload);
        assert_eq!(r.decide("a.mov"), Decision::NotIncluded);
    }

    #[test]
    fn hidden_and_partial_files_are_excluded_by_default_and_can_be_re_included() {
        let r = rules("", DEFAULT_EXCLUDE);
        assert_eq!(r.decide(".a.mp4"), Decision::Excluded(".*".into()));
        assert_eq!(r.decide(".cache/a.mp4"), Decision::Excluded(".*".into()));
        assert!(r.prunes_dir("cam/.cache"));
        assert_eq!(r.decide("a.mp4.part"), Decision::Excluded("*.part".into()));
        assert_eq!(r.decide("d/.~lock.mp4"), Decision::Excluded(".*".into()));
        let all = rules("*.mp4,*.part", "");
        assert_eq!(all.decide(".cache/a.mp4"), Decision::Upload);
        assert_eq!(all.decide("a.part"), Decision::Upload);
    }

    #[test]
    fn double_star_spans_directories_and_single_star_does_not() {
        let r = rules("site-*/**/*.mp4", "**/archive/**");
        assert_eq!(r.decide("site-a/cam1/2026/x.mp4"), Decision::Upload);
        assert_eq!(r.decide("site-a/x.mp4"), Decision::Upload);
        assert_eq!(r.decide("other/x.mp4"), Decision::NotIncluded);
        assert_eq!(
            r.decide("site-a/archive/x.mp4"),
            Decision::Excluded("**/archive/**".into())
        );
        let shallow = rules("cams/*.mp4", "");
        assert_eq!(shallow.decide("cams/deep/x.mp4"), Decision::NotIncluded);
    }

    #[test]
    fn exclusion_wins_and_braces_keep_their_commas() {
        let r = rules("*.{mp4,mov}", "*-preview.*");
        assert_eq!(r.decide("a.mov"), Decision::Upload);
        assert!(matches!(r.decide("a-preview.mp4"), Decision::Excluded(_)));
        assert!(!r.wants("a-preview.mp4"));
    }

    #[test]
    fn unicode_paths_match() {
        let r = rules("kamera-ü/**/*.mp4", "");
        assert_eq!(
            r.decide("kamera-ü/Überwachung 東京/fünf.mp4"),
            Decision::Upload
        );
    }

    #[test]
    fn a_pattern_that_does_not_parse_names_its_variable() {
        for (include, exclude, variable) in [("a[", "", "INCLUDE"), ("", "*.{mp4", "EXCLUDE")] {
            let err = Rules::parse(include, exclude, &["mp4".into()]).unwrap_err();
            assert!(err.to_string().contains(variable), "{err}");
        }
    }
}
