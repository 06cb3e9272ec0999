//! Logging setup: text (simplelog) or JSON lines, to stderr, in UTC.
//!
//! Text is simplelog with RFC 3339 timestamps. simplelog has no JSON mode, so
//! `LOG_FORMAT=json` plugs a small `SharedLogger` of our own into the same
//! `CombinedLogger`: one object per line with `ts`, `level`, `msg`, plus the
//! structured fields a log call carries (`stream_id`, `path`, `chunk`).
//! Dependencies' own output (HTTP client internals) is filtered out.

use std::io::Write;

use log::kv::{Key, Value, VisitSource};
use log::{LevelFilter, Log, Metadata, Record};
use simplelog::{CombinedLogger, ConfigBuilder, SharedLogger, WriteLogger};

/// Only chunkstream's own records are logged.
const OWN_TARGET: &str = "chunkstream";

/// `LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global logger. Safe to call once per process.
pub fn init(level: LevelFilter, format: LogFormat) {
    let logger: Box<dyn SharedLogger> = match format {
        LogFormat::Text => WriteLogger::new(
            level,
            ConfigBuilder::new()
                .set_time_format_rfc3339()
                .set_thread_level(LevelFilter::Off)
                .set_target_level(LevelFilter::Off)
                .set_location_level(LevelFilter::Off)
                .add_filter_allow_str(OWN_TARGET)
                .build(),
            std::io::stderr(),
        ),
        LogFormat::Json => Box::new(JsonLogger { level }),
    };
    // Only fails if a logger is already installed, which is then kept.
    let _ = CombinedLogger::init(vec![logger]);
}

/// One JSON object per line on stderr.
pub struct JsonLogger {
    level: LevelFilter,
}

struct Fields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl<'kvs> VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let json = match value.to_u64() {
            Some(number) => serde_json::Value::from(number),
            None => serde_json::Value::from(value.to_string()),
        };
        self.0.insert(key.as_str().to_string(), json);
        Ok(())
    }
}

/// The JSON line for a record (without the newline).
pub fn json_line(record: &Record) -> String {
    let mut object = serde_json::Map::new();
    object.insert(
        "ts".into(),
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
            .to_string()
            .into(),
    );
    object.insert(
        "level".into(),
        record.level().as_str().to_ascii_lowercase().into(),
    );
    object.insert("msg".into(), record.args().to_string().into());
    let _ = record.key_values().visit(&mut Fields(&mut object));
    serde_json::Value::Object(object).to_string()
}

impl Log for JsonLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level && metadata.target().starts_with(OWN_TARGET)
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            let line = json_line(record);
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "{line}");
        }
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

impl SharedLogger for JsonLogger {
    fn level(&self) -> LevelFilter {
        self.level
    }

    fn config(&self) -> Option<&simplelog::Config> {
        None
    }

    fn as_log(self: Box<Self>) -> Box<dyn Log> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_carry_the_structured_fields() {
        let kvs: [(&str, Value); 3] = [
            ("stream_id", Value::from("cam-1")),
            ("path", Value::from("a/cam.mp4")),
            ("chunk", Value::from(7u64)),
        ];
        let line = json_line(
            &Record::builder()
                .args(format_args!("chunk \"uploaded\""))
                .level(log::Level::Debug)
                .target("chunkstream::upload")
                .key_values(&kvs)
                .build(),
        );
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["level"], "debug");
        assert_eq!(parsed["msg"], "chunk \"uploaded\"");
        assert_eq!(parsed["stream_id"], "cam-1");
        assert_eq!(parsed["path"], "a/cam.mp4");
        assert_eq!(parsed["chunk"], 7);
        assert!(parsed["ts"].as_str().unwrap().ends_with('Z'));
    }
}
