"""Policy gate service: checks every command, records rejections, and publishes decisions."""
