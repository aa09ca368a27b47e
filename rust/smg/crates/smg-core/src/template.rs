//! `template`: see lib.rs.
