"""placeholder: being written"""
def rkd_distance(*a, **k):
    raise NotImplementedError
rkd_angle = similarity_preserving = rkd_distance
