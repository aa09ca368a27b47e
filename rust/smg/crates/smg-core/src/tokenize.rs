//! `tokenize`: see lib.rs.
