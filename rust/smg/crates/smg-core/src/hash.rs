//! `hash`: see lib.rs.
