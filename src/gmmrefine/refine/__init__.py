"""gmmrefine.refine"""
