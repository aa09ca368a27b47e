//! `fetch`: see lib.rs.
