"""Only what pyproject.toml cannot say: the site's templates/ and static/, kept at the top of the
repository, go into the wheel as aiqueue/templates and aiqueue/static (aiqueue.settings looks
in both places). Every other package is found, so a new app is packaged without a change here."""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(exclude=["tests", "tests.*", "bench", "bench.*"]),
        "aiqueue.templates",
        "aiqueue.static",
    ],
    package_dir={"aiqueue.templates": "templates", "aiqueue.static": "static"},
    package_data={
        "aiqueue": ["supervisord.conf"],
        "aiqueue.templates": ["**/*.html", "**/*.txt"],
        "aiqueue.static": ["**/*"],
    },
)
