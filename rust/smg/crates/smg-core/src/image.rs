//! `image`: see lib.rs.
