//! Media duration from MP4 boxes, for `metadata.json`.
//!
//! chunkstream is a byte uploader first: a file that is not a readable MP4 is
//! still uploaded, and its duration is simply `None`. The top-level boxes are
//! walked by hand so that `mdat` (gigabytes) is skipped, not read, and every
//! box is checked to lie within the file before it is trusted, because the
//! writer may have died half-way. Parsing of `moov`/`moof` is left to
//! mp4-atom, the parser that survived fuzzing best (see docs/architecture.md).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use mp4_atom::{FourCC, Header, Moof, Moov, ReadAtom, ReadFrom};

/// Larger `moov` or `moof` boxes are not parsed (a sane one is a few MiB).
const MAX_PARSED_BOX_BYTES: usize = 64 * 1024 * 1024;

/// The media duration in seconds, or `None` when the file is not a readable
/// MP4 (not MP4 at all, truncated before `moov`, corrupt boxes).
pub fn mp4_duration_seconds(path: &Path) -> Option<f64> {
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let mut movie: Option<Moov> = None;
    let mut fragments = FragmentDurations::default();
    let mut position = 0u64;
    let mut saw_ftyp = false;

    while position < len {
        file.seek(SeekFrom::Start(position)).ok()?;
        let header = match <Option<Header> as ReadFrom>::read_from(&mut file) {
            Ok(Some(header)) => header,
            _ => break,
        };
        let body_start = file.stream_position().ok()?;
        let body_len = match header.size {
            Some(size) => size as u64,
            None => len - body_start,
        };
        let body_end = body_start.checked_add(body_len)?;
        if body_end > len {
            break; // a box the writer did not finish
        }
        if position == 0 {
            saw_ftyp = header.kind == FourCC::new(b"ftyp") || header.kind == FourCC::new(b"styp");
            if !saw_ftyp {
                return None;
            }
        }
        match header.kind {
            kind if kind == FourCC::new(b"moov") && body_len as usize <= MAX_PARSED_BOX_BYTES => {
                movie = Moov::read_atom(&header, &mut (&mut file).take(body_len)).ok();
            }
            kind if kind == FourCC::new(b"moof") && body_len as usize <= MAX_PARSED_BOX_BYTES => {
                if let Ok(moof) = Moof::read_atom(&header, &mut (&mut file).take(body_len)) {
                    fragments.add(&moof);
                }
            }
            _ => {}
        }
        position = body_end;
    }

    let movie = movie.filter(|_| saw_ftyp)?;
    let timescale = f64::from(movie.mvhd.timescale);
    if movie.mvhd.duration > 0 && timescale > 0.0 {
        return Some(movie.mvhd.duration as f64 / timescale);
    }
    let mvex = movie.mvex.as_ref()?;
    if let Some(mehd) = &mvex.mehd
        && mehd.fragment_duration > 0
        && timescale > 0.0
    {
        return Some(mehd.fragment_duration as f64 / timescale);
    }
    fragments.seconds(&movie)
}

/// Sample durations summed per track across all `moof` boxes.
#[derive(Default)]
struct FragmentDurations {
    /// Per track: ticks with known durations, and samples whose duration comes
    /// from the track's `trex` default.
    per_track: HashMap<u32, (u64, u64)>,
}

impl FragmentDurations {
    fn add(&mut self, moof: &Moof) {
        for traf in &moof.traf {
            let entry = self.per_track.entry(traf.tfhd.track_id).or_default();
            let default = traf.tfhd.default_sample_duration;
            for trun in &traf.trun {
                for sample in trun.samples.iter() {
                    match sample.duration.or(default) {
                        Some(ticks) => entry.0 += u64::from(ticks),
                        None => entry.1 += 1,
                    }
                }
            }
        }
    }

    /// The longest track's duration.
    fn seconds(&self, movie: &Moov) -> Option<f64> {
        let trex_default = |track: u32| {
            movie.mvex.as_ref().and_then(|mvex| {
                mvex.trex
                    .iter()
                    .find(|trex| trex.track_id == track)
                    .map(|trex| u64::from(trex.default_sample_duration))
            })
        };
        self.per_track
            .iter()
            .filter_map(|(&track, &(ticks, defaulted))| {
                let trak = movie.trak.iter().find(|t| t.tkhd.track_id == track)?;
                let timescale = trak.mdia.mdhd.timescale;
                let total = ticks + defaulted * trex_default(track).unwrap_or(0);
                (timescale > 0).then(|| total as f64 / f64::from(timescale))
            })
            .reduce(f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Makes a 2-second test MP4 with ffmpeg, or explains why it cannot.
    fn ffmpeg_fixture(dir: &Path, name: &str, extra: &[&str]) -> Option<std::path::PathBuf> {
        let out = dir.join(name);
        let status = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-y"])
            .args([
                "-f",
                "lavfi",
                "-i",
                "testsrc=size=160x120:rate=25:duration=2",
            ])
            .args(["-f", "lavfi", "-i", "sine=frequency=440:duration=2"])
            .args([
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-g",
                "25",
                "-c:a",
                "aac",
            ])
            .args(extra)
            .arg(&out)
            .status();
        match status {
            Ok(status) if status.success() => Some(out),
            _ if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("ffmpeg is required when CI=true")
            }
            _ => {
                eprintln!("skipping: ffmpeg not available");
                None
            }
        }
    }

    fn assert_close(actual: Option<f64>, expected: f64) {
        let actual = actual.expect("a duration");
        assert!(
            (actual - expected).abs() < 0.1,
            "duration {actual} not within 0.1 s of {expected}"
        );
    }

    #[test]
    fn durations_of_normal_faststart_and_fragmented_files() {
        let dir = tempfile::tempdir().unwrap();
        let Some(normal) = ffmpeg_fixture(dir.path(), "normal.mp4", &[]) else {
            return;
        };
        assert_close(mp4_duration_seconds(&normal), 2.0);
        let faststart =
            ffmpeg_fixture(dir.path(), "fast.mp4", &["-movflags", "+faststart"]).unwrap();
        assert_close(mp4_duration_seconds(&faststart), 2.0);
        let fragmented = ffmpeg_fixture(
            dir.path(),
            "frag.mp4",
            &["-movflags", "frag_keyframe+empty_moov+default_base_moof"],
        )
        .unwrap();
        assert_close(mp4_duration_seconds(&fragmented), 2.0);
    }

    #[test]
    fn truncated_and_foreign_files_have_no_duration_and_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let Some(normal) = ffmpeg_fixture(dir.path(), "normal.mp4", &[]) else {
            return;
        };
        let bytes = std::fs::read(&normal).unwrap();
        for cut in [0, 7, 8, 40, bytes.len() / 2, bytes.len() - 1] {
            let truncated = dir.path().join(format!("cut-{cut}.mp4"));
            std::fs::write(&truncated, &bytes[..cut]).unwrap();
            assert_eq!(mp4_duration_seconds(&truncated), None, "cut at {cut}");
        }
        let text = dir.path().join("text.mp4");
        std::fs::write(&text, b"this is not a video at all, just bytes").unwrap();
        assert_eq!(mp4_duration_seconds(&text), None);
        assert_eq!(mp4_duration_seconds(&dir.path().join("absent.mp4")), None);
    }

    #[test]
    fn a_truncated_fragmented_file_reports_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let Some(fragmented) = ffmpeg_fixture(
            dir.path(),
            "frag.mp4",
            &["-movflags", "frag_keyframe+empty_moov+default_base_moof"],
        ) else {
            return;
        };
        let bytes = std::fs::read(&fragmented).unwrap();
        let cut = dir.path().join("frag-cut.mp4");
        std::fs::write(&cut, &bytes[..bytes.len() * 3 / 4]).unwrap();
        if let Some(partial) = mp4_duration_seconds(&cut) {
            assert!(partial > 0.0 && partial < 2.0 + 0.1, "partial {partial}");
        }
    }
}
