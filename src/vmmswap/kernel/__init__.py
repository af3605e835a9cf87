"""The kernel ABI, in one place.

Every constant, ioctl number, struct layout and libc call the project uses lives in this package.
The C headers installed on the build machines are older than the kernels the project runs on, so
nothing here is read from them: values are written out and ioctl numbers are computed with the
``_IOC`` helpers of :mod:`vmmswap.kernel.ioctl`.
"""
