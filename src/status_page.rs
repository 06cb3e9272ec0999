//! The live status page served at `GET /` on `METRICS_ADDR`.
//!
//! Operators would rather look than read JSON, so this is one self-contained
//! HTML page: no external assets, no framework, a few lines of script that
//! poll `/streams`, `/readyz` and `/metrics` (for the bandwidth gauge) every
//! second and draw a health summary and one row per stream. File names are
//! user data: the script only ever sets `textContent` and attributes, never
//! `innerHTML`, so a file named `<img src=x onerror=alert(1)>.mp4` shows as
//! text. The page is static, so serving it costs the HTTP thread nothing.

/// The page (src/status_page.html).
pub const PAGE: &str = include_str!("status_page.html");
