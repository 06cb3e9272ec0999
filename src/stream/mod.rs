//! Streams: the pure lifecycle (`state`), one stream as tracked (`tracked`),
//! and the table that feeds them (`table`).

pub mod state;
pub mod table;
pub mod tracked;
