//! `wire`: see lib.rs.
