"""fsr.pruning"""
