//! ccnet's device inference engine: `#![no_std]`, never allocates.
//!
//! This crate currently validates containers through [`Model::parse`]; running them
//! (`arena_bytes`, `run`) is not implemented yet and returns
//! [`DeviceError::NotImplemented`].
#![no_std]
#![deny(unsafe_code)]
#![warn(missing_docs)]

use ccnet_shared::format::{Container, FormatError};

/// Errors of the device engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceError {
    /// The container is invalid.
    Format(FormatError),
    /// The operation is not implemented yet.
    NotImplemented,
}

impl From<FormatError> for DeviceError {
    fn from(e: FormatError) -> Self {
        DeviceError::Format(e)
    }
}

/// A validated model borrowing its container bytes.
pub struct Model<'a> {
    container: Container<'a>,
}

impl<'a> Model<'a> {
    /// Validates a container once (magic, version, CRC, bounds, shapes, graph).
    pub fn parse(bytes: &'a [u8]) -> Result<Model<'a>, DeviceError> {
        Ok(Model {
            container: Container::parse(bytes)?,
        })
    }

    /// The validated container.
    pub fn container(&self) -> &Container<'a> {
        &self.container
    }

    /// Scratch bytes a run needs: not implemented yet.
    pub fn arena_bytes(&self, _height: u32, _width: u32) -> Result<usize, DeviceError> {
        Err(DeviceError::NotImplemented)
    }
}
