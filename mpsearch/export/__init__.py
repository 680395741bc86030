"""Writers that turn a plan into files a runtime or toolchain accepts."""
