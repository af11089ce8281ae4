//! CC-Net's accuracy model: the fits of equations (1) and (2) ([`fit`]), the sweep of
//! training runs that feeds them ([`sweep`]), the calibration file ([`file`]) and the
//! choice of α for a user constraint ([`select`]).

pub mod file;
pub mod fit;
pub mod select;
pub mod sweep;
