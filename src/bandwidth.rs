//! The upload bandwidth cap: `BANDWIDTH_LIMIT`, `BANDWIDTH_SCHEDULE` and `TZ`.
//!
//! Recording sites share a thin uplink with everything else, so the cap is
//! one token bucket shared by every worker and every request body, and it is
//! smooth at sub-second scale: a body is fed to the socket in
//! [`SLICE`]-sized pieces, each waiting for its tokens, and the bucket holds
//! at most a twentieth of a second's worth, so a link never sees a whole
//! chunk in one burst followed by silence.
//!
//! The schedule is evaluated on every slice (a few hundred times a second at
//! most, a handful of comparisons each), so a window boundary takes effect
//! within one slice. Time zones come from `jiff` (BurntSushi's date library:
//! no tokio, builds on our rustc, and with `tzdb-bundle-always` it carries
//! the tz database itself, so a slim container without tzdata still knows
//! `Europe/Berlin`).

use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;

use crate::error::ConfigError;

/// Bytes fed to the socket per wait for tokens.
pub const SLICE: usize = 64 * 1024;
/// The longest one wait lasts before the limit is looked up again, so a
/// schedule switch is never slept through.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// A limit in bytes per second; `None` is unlimited.
pub type Limit = Option<u64>;

/// The validated settings.
#[derive(Debug, Clone)]
pub struct BandwidthPolicy {
    /// `BANDWIDTH_LIMIT`: the limit outside every schedule window.
    pub default: Limit,
    pub schedule: Vec<Window>,
    pub time_zone: TimeZone,
}

/// One `BANDWIDTH_SCHEDULE` entry: `[DAYS] [HH:MM-HH:MM]=LIMIT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Bit `n` set: the window starts on weekday `n` (Monday = 0).
    days: u8,
    /// `None`: all day.
    hours: Option<(Time, Time)>,
    limit: Limit,
}

const ALL_DAYS: u8 = 0b111_1111;
const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Window {
    fn matches(&self, day: Weekday, time: Time) -> bool {
        let on = |day: Weekday| self.days & (1 << day.to_monday_zero_offset()) != 0;
        match self.hours {
            None => on(day),
            Some((start, end)) if start < end => on(day) && start <= time && time < end,
            // Past midnight: the early hours belong to the day before.
            Some((start, end)) => (on(day) && time >= start) || (on(day.previous()) && time < end),
        }
    }
}

impl BandwidthPolicy {
    /// Parses the three settings; errors name the variable.
    pub fn parse(limit: &str, schedule: &str, time_zone: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            default: parse_limit(limit)
                .map_err(|why| ConfigError::bad_value("BANDWIDTH_LIMIT", limit, why))?,
            schedule: parse_schedule(schedule)
                .map_err(|why| ConfigError::bad_value("BANDWIDTH_SCHEDULE", schedule, why))?,
            time_zone: parse_time_zone(time_zone)
                .map_err(|why| ConfigError::bad_value("TZ", time_zone, why))?,
        })
    }

    /// The limit in force at `now`: the first window that matches, else
    /// `BANDWIDTH_LIMIT`.
    pub fn limit_at(&self, now: Timestamp) -> Limit {
        if self.schedule.is_empty() {
            return self.default;
        }
        let local = self.time_zone.to_datetime(now);
        self.schedule
            .iter()
            .find(|window| window.matches(local.weekday(), local.time()))
            .map_or(self.default, |window| window.limit)
    }

    /// The lowest limit the policy can ever impose (`None`: never limited).
    fn lowest(&self) -> Limit {
        std::iter::once(self.default)
            .chain(self.schedule.iter().map(|window| window.limit))
            .flatten()
            .min()
    }

    pub fn is_unlimited(&self) -> bool {
        self.lowest().is_none()
    }
}

/// `20MiB`, `5000000`; empty or `off` is unlimited. Zero is refused: a paused
/// upload would only time out.
fn parse_limit(value: &str) -> Result<Limit, String> {
    let value = value.trim();
    if value.is_empty() || value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    match value.parse::<bytesize::ByteSize>() {
        Ok(size) if size.as_u64() > 0 => Ok(Some(size.as_u64())),
        Ok(_) => Err("must be greater than zero (use off for unlimited)".into()),
        Err(err) => Err(format!("{err} (use bytes per second, e.g. 20MiB, or off)")),
    }
}

fn parse_schedule(value: &str) -> Result<Vec<Window>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(parse_window)
        .collect()
}

/// `Mon-Fri 08:00-18:00=5MiB`, `Sat=off`, `22:00-06:00=1MiB`, `*=off`.
fn parse_window(entry: &str) -> Result<Window, String> {
    let hint = "expected e.g. Mon-Fri 08:00-18:00=5MiB, 22:00-06:00=1MiB or *=off";
    let (when, limit) = entry
        .split_once('=')
        .ok_or_else(|| format!("{entry:?} has no =LIMIT; {hint}"))?;
    let limit = parse_limit(limit).map_err(|why| format!("{entry:?}: {why}"))?;
    let mut window = Window {
        days: ALL_DAYS,
        hours: None,
        limit,
    };
    for part in when.split_whitespace() {
        if part == "*" {
            continue;
        } else if part.contains(':') {
            let (start, end) = part
                .split_once('-')
                .ok_or_else(|| format!("{entry:?}: {part:?} is not HH:MM-HH:MM"))?;
            let time = |text: &str| {
                Time::strptime("%H:%M:%S", text)
                    .or_else(|_| Time::strptime("%H:%M", text))
                    .map_err(|_| format!("{entry:?}: {text:?} is not a time of day (HH:MM)"))
            };
            window.hours = Some((time(start)?, time(end)?));
        } else {
            window.days = parse_days(part).ok_or_else(|| {
                format!("{entry:?}: {part:?} is not a day or day range (Mon, Sat-Sun)")
            })?;
        }
    }
    Ok(window)
}

/// `Mon`, `Mon-Fri`, `Fri-Mon` (wrapping), case-insensitive.
fn parse_days(text: &str) -> Option<u8> {
    let day = |name: &str| {
        let name = name.to_ascii_lowercase();
        DAY_NAMES
            .iter()
            .position(|day| name.starts_with(day) && name.len() >= 3)
    };
    let (first, last) = match text.split_once('-') {
        Some((first, last)) => (day(first)?, day(last)?),
        None => (day(text)?, day(text)?),
    };
    let mut days = 0;
    let mut current = first;
    loop {
        days |= 1 << current;
        if current == last {
            return Some(days);
        }
        current = (current + 1) % 7;
    }
}

/// An IANA name (`Europe/Berlin`, with or without a leading `:`), `UTC`, or
/// a POSIX TZ string (`CET-1CEST,M3.5.0,M10.5.0/3`).
fn parse_time_zone(value: &str) -> Result<TimeZone, String> {
    let name = value.trim().trim_start_matches(':');
    if name.is_empty() {
        return Ok(TimeZone::UTC);
    }
    TimeZone::get(name)
        .or_else(|_| TimeZone::posix(name))
        .map_err(|_| "not a known time zone name (e.g. Europe/Berlin) or POSIX TZ string".into())
}

/// The bucket every request body draws from.
pub struct Bandwidth {
    policy: BandwidthPolicy,
    /// How many bodies may draw at once (the workers): a body's fair share
    /// of the lowest limit is what its timeout allows for.
    sharers: u64,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Bandwidth {
    pub fn new(policy: BandwidthPolicy, sharers: usize) -> Self {
        Self {
            policy,
            sharers: sharers.max(1) as u64,
            bucket: Mutex::new(Bucket {
                tokens: 0.0,
                refilled: Instant::now(),
            }),
        }
    }

    /// The limit in force now.
    pub fn limit_now(&self) -> Limit {
        self.policy.limit_at(Timestamp::now())
    }

    /// Blocks until `bytes` may be sent.
    fn take(&self, bytes: usize) {
        loop {
            let Some(rate) = self.limit_now() else {
                return;
            };
            let rate = rate as f64;
            let wait = {
                let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
                let capacity = (rate / 20.0).max(SLICE as f64);
                bucket.tokens = (bucket.tokens + elapsed * rate).min(capacity);
                bucket.refilled = now;
                if bucket.tokens >= bytes as f64 {
                    bucket.tokens -= bytes as f64;
                    return;
                }
                Duration::from_secs_f64((bytes as f64 - bucket.tokens) / rate)
            };
            std::thread::sleep(wait.min(MAX_WAIT));
        }
    }

    /// How long a request with a body of `body_len` bytes may take: `base`
    /// (S3_REQUEST_TIMEOUT) plus the time the body needs at its share of the
    /// lowest limit, so a legitimately slow, throttled PUT is not timed out.
    pub fn request_timeout(&self, base: Duration, body_len: u64) -> Duration {
        match self.policy.lowest() {
            None => base,
            Some(lowest) => {
                base + Duration::from_secs_f64(
                    body_len as f64 * self.sharers as f64 / lowest as f64,
                )
            }
        }
    }

    /// `body` as a reader that takes tokens before every slice it yields.
    pub fn reader<'a>(&'a self, body: &'a [u8]) -> Throttled<'a> {
        Throttled {
            bandwidth: self,
            rest: body,
        }
    }
}

/// A request body read through the bucket.
pub struct Throttled<'a> {
    bandwidth: &'a Bandwidth,
    rest: &'a [u8],
}

impl Read for Throttled<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(SLICE).min(self.rest.len());
        if n == 0 {
            return Ok(0);
        }
        self.bandwidth.take(n);
        let (now, rest) = self.rest.split_at(n);
        buf[..n].copy_from_slice(now);
        self.rest = rest;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(limit: &str, schedule: &str, tz: &str) -> BandwidthPolicy {
        BandwidthPolicy::parse(limit, schedule, tz).unwrap()
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn a_working_day_window_applies_in_the_configured_time_zone() {
        let p = policy("", "Mon-Fri 08:00-18:00=5MiB, *=off", "Europe/Berlin");
        // Monday 2026-11-30 09:00 in Berlin is 08:00 UTC.
        assert_eq!(p.limit_at(at("2026-11-30T08:00:00Z")), Some(5 * MIB));
        assert_eq!(p.limit_at(at("2026-11-30T06:59:59Z")), None);
        assert_eq!(p.limit_at(at("2026-11-30T17:00:00Z")), None);
        // Saturday.
        assert_eq!(p.limit_at(at("2026-12-05T10:00:00Z")), None);
    }

    #[test]
    fn unmatched_times_fall_back_to_bandwidth_limit() {
        let p = policy("20MiB", "Sat-Sun=off", "UTC");
        assert_eq!(p.limit_at(at("2026-11-30T12:00:00Z")), Some(20 * MIB));
        assert_eq!(p.limit_at(at("2026-11-29T12:00:00Z")), None);
    }

    #[test]
    fn overnight_windows_belong_to_the_day_they_start() {
        let p = policy("off", "Fri 22:00-06:00=1MiB", "UTC");
        assert_eq!(p.limit_at(at("2026-12-04T23:00:00Z")), Some(MIB)); // Fri night
        assert_eq!(p.limit_at(at("2026-12-05T05:59:59Z")), Some(MIB)); // Sat early
        assert_eq!(p.limit_at(at("2026-12-05T23:00:00Z")), None); // Sat night
        assert_eq!(p.limit_at(at("2026-12-04T05:00:00Z")), None); // Fri early
    }

    #[test]
    fn seconds_may_be_given_for_precise_boundaries() {
        let p = policy("off", "12:00:30-12:01:00=1MiB", "UTC");
        assert_eq!(p.limit_at(at("2026-11-30T12:00:29Z")), None);
        assert_eq!(p.limit_at(at("2026-11-30T12:00:30Z")), Some(MIB));
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (limit, schedule, tz, variable) in [
            ("fast", "", "UTC", "BANDWIDTH_LIMIT"),
            ("0", "", "UTC", "BANDWIDTH_LIMIT"),
            ("", "Mon-Fri 08:00-18:00", "UTC", "BANDWIDTH_SCHEDULE"),
            ("", "Mon-Fry=1MiB", "UTC", "BANDWIDTH_SCHEDULE"),
            ("", "25:00-26:00=1MiB", "UTC", "BANDWIDTH_SCHEDULE"),
            ("", "", "Mars/Olympus_Mons", "TZ"),
        ] {
            let err = BandwidthPolicy::parse(limit, schedule, tz).unwrap_err();
            assert!(err.to_string().contains(variable), "{err}");
        }
    }

    #[test]
    fn timeouts_allow_for_a_body_at_its_share_of_the_lowest_limit() {
        let bandwidth = Bandwidth::new(policy("10MiB", "Sat=1MiB", "UTC"), 2);
        assert_eq!(
            bandwidth.request_timeout(Duration::from_secs(60), 10 * MIB),
            Duration::from_secs(80)
        );
        let unlimited = Bandwidth::new(policy("", "", "UTC"), 2);
        assert_eq!(
            unlimited.request_timeout(Duration::from_secs(60), 10 * MIB),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn a_throttled_body_arrives_whole_in_small_slices() {
        let bandwidth = Bandwidth::new(policy("100MiB", "", "UTC"), 1);
        let body: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let mut reader = bandwidth.reader(&body);
        let mut buf = vec![0; 1 << 20];
        let mut read = Vec::new();
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            assert!(n <= SLICE);
            read.extend_from_slice(&buf[..n]);
        }
        assert_eq!(read, body);
    }
}
