from pymooncake.testing.fixtures import netns  # noqa: F401  (fixture used by name)
