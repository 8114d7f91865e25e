"""The edge agent gateway daemon (`agw`)."""
