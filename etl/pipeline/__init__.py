"""The nightly run: extract -> land -> stage -> map + build -> gate -> publish -> report."""
