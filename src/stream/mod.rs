//! Streams: the pure lifecycle (`state`) and the table that feeds it (`table`).

pub mod state;
pub mod table;
