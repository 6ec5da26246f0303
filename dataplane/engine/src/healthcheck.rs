//! Health check runner (in progress).
