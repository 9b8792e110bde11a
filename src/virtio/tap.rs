//! tap (placeholder while written).
