//! capsa host runtime library.
