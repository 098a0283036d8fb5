"""The container tests: the images, Docker and compose (`make test-containers`)."""
