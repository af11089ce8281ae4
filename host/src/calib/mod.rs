//! CC-Net's accuracy model: the fits of equations (1) and (2) ([`fit`]), the sweep of
//! training runs that feeds them ([`sweep`]), the calibration file ([`file`]), the
//! choice of α for a user constraint ([`select`]) the hand-over of a sweep to Slurm
//! ([`slurm`]) and the leave-one-dataset-out validation of a calibration ([`validate`]).

pub mod file;
pub mod fit;
pub mod select;
pub mod slurm;
pub mod sweep;
pub mod validate;
