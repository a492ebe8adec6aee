"""Reference models the devices are compared with after every fuzzing step."""
