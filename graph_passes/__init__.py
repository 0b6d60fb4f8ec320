"""fsr.graph_passes"""
