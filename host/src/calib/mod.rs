//! CC-Net's accuracy model: the fits of equations (1) and (2) ([`fit`]) and the choice
//! of α for a user constraint ([`select`]).

pub mod fit;
pub mod select;
