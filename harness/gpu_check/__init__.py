"""The GPU check, an operations tool apart from the library: `python -m harness.gpu_check` (see __main__). `check`
runs the parts (`parts`) in their own processes; `probes` measures packing and memory; `bundle` carries what a bare
GPU machine lacks.
"""
