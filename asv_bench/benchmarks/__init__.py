"""nero-core's airspeed-velocity suite: optimizer steps on realistic shape sets (see asv_bench/README.md)."""
