//! Tests for the configuration front end.
