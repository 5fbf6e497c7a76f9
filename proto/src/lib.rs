//! capsa agent API (generated).
