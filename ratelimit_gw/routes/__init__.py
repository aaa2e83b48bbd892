"""The HTTP routes: each parses its request, prices it and hands it to the metering."""
